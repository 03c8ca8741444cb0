import logging

import numpy as np
import pytest
import torch

from medfusionnet.constants import LABELS
from medfusionnet.data.loaders import data_loader
from medfusionnet.data.nih import folder_records, prepare_datasets
from medfusionnet.data.tabular import NUM_TABULAR_FEATURES, TabularEncoder
from medfusionnet.data.transforms import XrayDataset, xray_transforms
from medfusionnet.data.unreadable import SKIPPED_KEY, UnreadableImageError, collate_skipping_unreadable


@pytest.fixture
def encoder():
    return TabularEncoder().fit([{"age": 40, "follow_up": 2}, {"age": 60, "follow_up": 0}])


def test_real_nih_item_shapes(nih_dir, encoder):
    data = prepare_datasets(str(nih_dir), str(nih_dir / "labels.csv"), str(nih_dir / "images_256"))
    item = xray_transforms(encoder, 64, train=True)(data.train[0])
    assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0001
    assert item["tabular"].shape == (NUM_TABULAR_FEATURES,) and item["label"].shape == (len(LABELS),)
    assert "age" not in item and "patient_id" not in item and item["name"] == data.train[0]["name"]


def test_dicom_header_feeds_tabular(dicom_files, encoder):
    records = folder_records(str(dicom_files[0].parent))
    items = [xray_transforms(encoder, 64, with_label=False)(r) for r in records]
    for item in items:
        tab = item["tabular"].numpy()
        assert item["image"].shape == (1, 64, 64)
        assert tab[1] == 0 and tab[2] == 1  # age present, sex M
    siim = next(i for i in items if i["name"].startswith("1.2.276"))
    assert siim["tabular"][5] == 1  # view PA from the header
    assert siim["tabular"][0] == pytest.approx((62 - encoder.stats_["age"]["mean"]) / encoder.stats_["age"]["std"])


def test_non_square_image_is_padded_not_distorted(tmp_path, encoder):
    from PIL import Image

    Image.fromarray(np.full((50, 100), 255, np.uint8)).save(tmp_path / "wide.png")
    item = xray_transforms(encoder, 64, with_label=False)({"image": str(tmp_path / "wide.png"), "name": "wide.png"})
    image = item["image"][0]
    assert image.shape == (64, 64)
    assert float(image[32, 32]) == pytest.approx(1.0) and float(image[0, 32]) == 0.0 and float(image[63, 32]) == 0.0


def _records(nih_dir, tmp_path):
    good = str(nih_dir / "images_256" / "00000075_000.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.dcm").write_bytes(b"junk")
    return [
        {"image": good, "name": "good.png", "label": np.zeros(14, np.float32)},
        {"image": str(tmp_path / "empty.png"), "name": "empty.png", "label": np.zeros(14, np.float32)},
        {"image": str(tmp_path / "junk.dcm"), "name": "junk.dcm", "label": np.zeros(14, np.float32)},
    ]


def test_unreadable_images_are_skipped_with_a_warning(nih_dir, tmp_path, encoder, caplog):
    dataset = XrayDataset(_records(nih_dir, tmp_path), xray_transforms(encoder, 64))
    with caplog.at_level(logging.WARNING):
        batch = collate_skipping_unreadable([dataset[i] for i in range(3)])
    assert batch["image"].shape == (1, 1, 64, 64) and list(batch["name"]) == ["good.png"]
    assert "empty.png" in caplog.text and "junk.dcm" in caplog.text
    # each skipped image keeps its name, its file and the reader's reason
    marks = {m["name"]: m for m in batch[SKIPPED_KEY]}
    assert set(marks) == {"empty.png", "junk.dcm"}
    assert marks["empty.png"]["image"] == str(tmp_path / "empty.png") and "empty" in marks["empty.png"]["error"]
    empty = collate_skipping_unreadable([dataset[1], dataset[2]])
    assert empty["image"].shape == (0, 1, 64, 64) and empty["tabular"].shape == (0, NUM_TABULAR_FEATURES)
    assert len(empty[SKIPPED_KEY]) == 2
    with pytest.raises(UnreadableImageError, match="empty.png, .*junk.dcm"):
        collate_skipping_unreadable([dataset[1], dataset[2]], train=True)
    assert SKIPPED_KEY not in collate_skipping_unreadable([dataset[0], dataset[1]], train=True)


def test_evaluation_loader_leaves_out_empty_batches(nih_dir, tmp_path, encoder):
    records = _records(nih_dir, tmp_path)
    dataset = XrayDataset([records[1], records[2], records[0]], xray_transforms(encoder, 64))
    loader = data_loader(dataset, batch_size=2)
    batches = list(loader)
    assert [list(b["name"]) for b in batches] == [["good.png"]]
    assert all(SKIPPED_KEY not in b for b in batches)  # the engine never sees the marks
    assert sorted(m["name"] for m in loader.skipped) == ["empty.png", "junk.dcm"]
    list(loader)  # a second pass starts a new list
    assert len(loader.skipped) == 2


def test_other_errors_are_not_hidden(encoder):
    dataset = XrayDataset([{"name": "x"}], xray_transforms(encoder, 64))  # no image key: a programming error
    with pytest.raises(Exception) as info:
        dataset[0]
    assert not isinstance(info.value, UnreadableImageError)


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_datasets_match_plain(nih_dir, tmp_path, encoder, cache):
    records = _records(nih_dir, tmp_path)[:1]
    transform = xray_transforms(encoder, 64)
    plain = XrayDataset(records, transform)[0]
    cached = XrayDataset(records, transform, cache=cache, cache_dir=str(tmp_path / "cache"))
    for _ in range(2):
        torch.testing.assert_close(cached[0]["image"], plain["image"])
    with pytest.raises(ValueError, match="cache='ram'"):
        XrayDataset(records, transform, cache="ram")
