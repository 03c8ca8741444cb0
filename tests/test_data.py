import logging
import os

import numpy as np
import pandas as pd
import pytest

from medfusionnet.constants import LABELS
from medfusionnet.data.nih import (
    as_paths,
    find_official_lists,
    folder_records,
    parse_findings,
    prepare_datasets,
    read_nih_csv,
    read_nih_csvs,
    split_frame,
)


def test_parse_findings():
    assert parse_findings("No Finding").sum() == 0
    vec = parse_findings("Effusion|Hernia")
    assert vec[LABELS.index("Effusion")] == 1 and vec[LABELS.index("Hernia")] == 1 and vec.sum() == 2
    with pytest.raises(ValueError, match="row 7: unknown finding 'Pneumonitis'"):
        parse_findings("Effusion|Pneumonitis", where="row 7")
    with pytest.raises(ValueError, match="empty"):
        parse_findings("  ", where="row 3")
    with pytest.raises(ValueError, match="unknown finding 'No Finding'"):
        parse_findings("No Finding|Mass")


def test_read_real_labels_csv(nih_dir):
    frame = read_nih_csv(str(nih_dir / "labels.csv"))
    assert len(frame) == 469
    counts = dict(zip(LABELS, np.stack(frame["label"]).sum(0)))
    # label distribution stated in PROVENANCE.md
    assert counts["Infiltration"] == 92 and counts["Hernia"] == 16 and counts["Edema"] == 12
    assert int((np.stack(frame["label"]).sum(1) == 0).sum()) == 78  # No Finding
    assert frame["age"].between(2, 86).all()


def test_read_kaggle_sample_labels(nih_dir):
    frame = read_nih_csv(str(nih_dir / "meta" / "sample_labels.csv"))
    assert len(frame) == 5606 and frame["patient_id"].nunique() == 4230
    first = frame.iloc[0]
    assert first["name"] == "00000013_005.png" and first["age"] == pytest.approx(60.0)  # "060Y"
    # "013M" and "001D" are valid DICOM ages in months and days
    assert frame["age"].min() < 2


def test_read_v2020_release(nih_dir):
    frame = read_nih_csv(str(nih_dir / "meta" / "Data_Entry_2017_v2020.csv.gz"))
    assert len(frame) == 112120 and frame["patient_id"].nunique() == 30805
    assert frame["age"].notna().all()


def test_impossible_ages_become_missing_with_a_warning(tmp_path, caplog):
    path = _write(
        tmp_path,
        [
            ["a.png", "Mass", 0, 1, 412, "M", "PA"],
            ["b.png", "Mass", 0, 2, "abc", "F", "AP"],
            ["c.png", "Mass", 0, 3, 0, "F", "AP"],
        ],
    )
    with caplog.at_level(logging.WARNING):
        frame = read_nih_csv(path)
    assert frame["age"].isna().tolist() == [True, True, False]
    assert "2 row(s) have an unparseable or implausible 'Patient Age' (e.g. line 2: '412')" in caplog.text


def _write(tmp_path, rows, columns=None):
    columns = columns or [
        "Image Index",
        "Finding Labels",
        "Follow-up #",
        "Patient ID",
        "Patient Age",
        "Patient Gender",
        "View Position",
    ]
    path = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return str(path)


def test_csv_errors_name_column_and_row(tmp_path):
    path = _write(
        tmp_path,
        [["a.png", "Mass", 0, 1, 50, "M"]],
        columns=["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender"],
    )
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['View Position'\]"):
        read_nih_csv(path)
    path = _write(tmp_path, [["a.png", "Mass", 0, 1, 50, "M", "PA"], ["b.png", "Masss", 0, 2, 50, "M", "PA"]])
    with pytest.raises(ValueError, match=r"line 3 \('b.png'\): unknown finding 'Masss'"):
        read_nih_csv(path)
    path = _write(tmp_path, [["a.png", "Mass", 0, 1, 50, "M", "PA"], ["a.png", "Mass", 1, 1, 50, "M", "PA"]])
    with pytest.raises(ValueError, match="duplicate 'Image Index'"):
        read_nih_csv(path)
    path = _write(tmp_path, [["a.png", "", 0, 1, 50, "M", "PA"]])
    with pytest.raises(ValueError, match=r"line 2 \('a.png'\): empty 'Finding Labels'"):
        read_nih_csv(path)


def _patients(frame):
    return set(frame["patient_id"])


def test_official_split_is_patient_disjoint(nih_dir):
    frame = read_nih_csv(str(nih_dir / "labels.csv"))
    assert find_official_lists(str(nih_dir)) is not None
    parts = split_frame(frame, "official", (str(nih_dir),), val_fraction=0.1, seed=0)
    assert len(parts["test"]) == 56  # images of labels.csv in test_list.txt (PROVENANCE.md)
    assert sum(len(p) for p in parts.values()) == len(frame)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not _patients(parts[a]) & _patients(parts[b])


def test_random_split_is_patient_disjoint_and_seeded(nih_dir):
    frame = read_nih_csv(str(nih_dir / "meta" / "sample_labels.csv"))
    parts = split_frame(frame, "random", (), val_fraction=0.1, test_fraction=0.2, seed=3)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not _patients(parts[a]) & _patients(parts[b])
    assert len(_patients(parts["test"])) == round(0.2 * frame["patient_id"].nunique())
    again = split_frame(frame, "random", (), val_fraction=0.1, test_fraction=0.2, seed=3)
    assert list(again["val"]["name"]) == list(parts["val"]["name"])
    other = split_frame(frame, "random", (), val_fraction=0.1, test_fraction=0.2, seed=4)
    assert list(other["val"]["name"]) != list(parts["val"]["name"])


def test_patient_in_both_official_lists_is_an_error(tmp_path):
    path = _write(tmp_path, [["a.png", "Mass", 0, 1, 50, "M", "PA"], ["b.png", "Mass", 1, 1, 50, "M", "PA"]])
    (tmp_path / "train_val_list.txt").write_text("a.png")
    (tmp_path / "test_list.txt").write_text("b.png")
    with pytest.raises(ValueError, match=r"patients \['1'\] appear in both"):
        split_frame(read_nih_csv(path), "official", (str(tmp_path),))
    with pytest.raises(ValueError, match="split='weird'"):
        split_frame(read_nih_csv(path), "weird")


def test_prepare_datasets_skips_missing_images(nih_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        data = prepare_datasets(
            str(nih_dir), str(nih_dir / "labels.csv"), str(nih_dir / "images_full"), output_dir=str(tmp_path)
        )
    assert len(data.train) + len(data.val) + len(data.test) == 150  # only 150 of the 469 exist at full size
    assert "319 image(s) listed" in caplog.text
    assert (tmp_path / "tabular_encoder.json").is_file() and (tmp_path / "label_counts.json").is_file()
    assert data.label_counts == np.sum([r["label"] for r in data.train], axis=0).astype(int).tolist()


def test_demo_dataset_is_deterministic_and_logged(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        a = prepare_datasets(None, demo_dir=str(tmp_path / "demo"))
    assert a.synthetic and "SYNTHETIC" in caplog.text
    b = prepare_datasets(None, demo_dir=str(tmp_path / "demo2"))
    assert [r["name"] for r in a.train] == [r["name"] for r in b.train]
    assert (tmp_path / "demo" / "images" / a.train[0]["name"]).read_bytes() == (
        tmp_path / "demo2" / "images" / b.train[0]["name"]
    ).read_bytes()
    for part in (a.train, a.val, a.test):  # the default split scores every finding: no AUC left out of the mean
        labels = np.array([r["label"] for r in part])
        assert (labels.sum(axis=0) > 0).all() and (labels.sum(axis=0) < len(part)).all()


def test_folder_records_with_tabular_csv(nih_dir):
    records = folder_records(str(nih_dir / "images_full"), str(nih_dir / "labels.csv"))
    assert len(records) == 150
    first = records[0]
    row = pd.read_csv(nih_dir / "labels.csv").set_index("Image Index").loc[first["name"]]
    assert str(first["age"]) == str(row["Patient Age"]) and first["sex"] == row["Patient Gender"]
    with pytest.raises(FileNotFoundError):
        folder_records(str(nih_dir / "no_such_folder"))


def test_folder_records_warn_about_images_without_a_tabular_row(nih_dir, tmp_path, caplog):
    (tmp_path / "00000002_000.png").symlink_to(nih_dir / "images_full" / "00000002_000.png")
    (tmp_path / "unknown.png").symlink_to(nih_dir / "images_full" / "00000002_000.png")
    with caplog.at_level("WARNING"):
        records = folder_records(str(tmp_path), str(nih_dir / "labels.csv"))
    assert "1 image(s) have no row" in caplog.text and "unknown.png" in caplog.text
    assert "age" in records[0] and "age" not in records[1]  # the unmatched image is encoded as missing


def test_datalist_records_for_inference(nih_dir, tmp_path):
    import json

    from medfusionnet.data.nih import datalist_records, inference_records

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "00000002_000.png").symlink_to(nih_dir / "images_full" / "00000002_000.png")
    listing = {
        "testing": [
            {"image": "imgs/00000002_000.png"},
            {"image": str(nih_dir / "images_full" / "00000353_000.png"), "name": "b", "age": "33"},
        ]
    }
    (tmp_path / "list.json").write_text(json.dumps(listing))
    records = inference_records(None, str(nih_dir / "labels.csv"), str(tmp_path / "list.json"))
    assert records[0]["image"] == str(tmp_path / "imgs" / "00000002_000.png") and records[0]["age"] is not None
    assert records[1]["name"] == "b" and records[1]["age"] == "33"  # the datalist's own field wins over the CSV
    (tmp_path / "plain.json").write_text(json.dumps([{"image": "imgs/00000002_000.png"}]))
    assert len(datalist_records(str(tmp_path / "plain.json"))) == 1
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(ValueError, match=r"bad.json: item 0 has no 'image'"):
        datalist_records(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="input_dir"):
        inference_records(None, None, None)


def test_several_labels_csvs_and_image_folders_train_as_one_set(nih_dir, tmp_path):
    """The 469 images at 256 px and the 751 thumbnails: 4 images are in both and keep the first CSV's row and the
    first folder's file; the official lists split the union patient-wise."""
    csvs = [str(nih_dir / "labels.csv"), str(nih_dir / "kcr64" / "labels.csv")]
    folders = [str(nih_dir / "images_256"), str(nih_dir / "kcr64" / "images")]
    first, second = (set(pd.read_csv(p)["Image Index"]) for p in csvs)
    data = prepare_datasets(str(nih_dir), os.pathsep.join(csvs), folders, output_dir=str(tmp_path))
    records = data.train + data.val + data.test
    names = [r["name"] for r in records]
    assert len(names) == len(set(names)) == len(first | second) == 1216
    shared = first & second
    assert len(shared) == 4
    for r in records:
        expected = folders[0] if r["name"] in first else folders[1]
        assert os.path.dirname(r["image"]) == expected
    patients = [{r["patient_id"] for r in part} for part in (data.train, data.val, data.test)]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])
    assert as_paths(os.pathsep.join(csvs)) == as_paths(csvs) == csvs


def test_labels_csvs_that_disagree_on_an_image_are_refused(nih_dir, tmp_path):
    other = pd.read_csv(nih_dir / "kcr64" / "labels.csv")
    shared = sorted(set(other["Image Index"]) & set(pd.read_csv(nih_dir / "labels.csv")["Image Index"]))[0]
    other.loc[other["Image Index"] == shared, "Finding Labels"] = "Hernia|Mass"
    other.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(ValueError, match=f"'{shared}' is listed in .*labels.csv and in .*other.csv"):
        read_nih_csvs([str(nih_dir / "labels.csv"), str(tmp_path / "other.csv")])
