import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import NIH, require, write_tiny_run
from monai.networks.nets import DenseNet121

from medfusionnet.constants import LABELS
from medfusionnet.data.tabular import NUM_TABULAR_FEATURES, TabularEncoder
from medfusionnet.data.transforms import xray_transforms
from medfusionnet.explain.saliency import (
    LayerwiseRelevance,
    LocalisationMetric,
    box_labels,
    cam_layers,
    explanation_map,
    gradcam,
    localisation_scores,
    map_peak,
    map_similarity,
    random_map,
    read_boxes,
    rescale_box,
)
from medfusionnet.networks.baselines import DenseNet121Tabular
from medfusionnet.networks.medfusionnet import MedFusionNet


def _entropy_given(a, b):
    """H(a | b) in bits from the joint counts of two label maps (the reference for false splits / merges)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    total, h = a.size, 0.0
    for value in np.unique(b):
        part = a[b == value]
        p = np.unique(part, return_counts=True)[1] / part.size
        h -= part.size / total * float((p * np.log2(p)).sum())
    return h


def test_identical_masks_score_perfectly():
    truth = np.zeros((10, 10), dtype=int)
    truth[2:6, 3:8] = 1
    scores = localisation_scores(truth.astype(float), truth)
    assert scores["adapted_rand_error"] == pytest.approx(0.0)
    assert scores["rand_precision"] == pytest.approx(1.0) and scores["rand_recall"] == pytest.approx(1.0)
    assert scores["false_splits"] == pytest.approx(0.0) and scores["false_merges"] == pytest.approx(0.0)
    assert scores["iou"] == 1.0 and scores["iobb"] == 1.0 and scores["pointing_hit"] == 1.0


def test_disjoint_mask_gives_the_hand_computed_values():
    truth = np.zeros((10, 10), dtype=int)
    truth[:5, :5] = 1
    saliency = np.zeros((10, 10))
    saliency[5:, 5:] = 1.0
    scores = localisation_scores(saliency, truth)
    # pixel pairs in the same region: joint counts (box, mask) (1, 0) 25, (0, 1) 25, (0, 0) 50 -> sum p^2 - n =
    # 3750 - 100; each marginal 25^2 + 75^2 - n = 6150; precision = recall = 3650 / 6150
    assert scores["rand_precision"] == pytest.approx(3650 / 6150)
    assert scores["rand_recall"] == pytest.approx(3650 / 6150)
    assert scores["adapted_rand_error"] == pytest.approx(2500 / 6150)
    # background of either side is split 1/3 : 2/3 by the other: 0.75 * H(1/3) bits
    assert scores["false_splits"] == pytest.approx(0.75 * 0.918296, abs=1e-5)
    assert scores["false_merges"] == pytest.approx(0.75 * 0.918296, abs=1e-5)
    assert scores["iou"] == 0.0 and scores["iobb"] == 0.0 and scores["pointing_hit"] == 0.0


def test_a_split_mask_shows_false_splits():
    truth = np.zeros((10, 10), dtype=int)
    truth[:, :5] = 1
    saliency = np.zeros((10, 10))
    saliency[:5, :5] = 1.0
    saliency[6:, :5] = 0.8  # a second blob in the same box, separated by an empty row
    scores = localisation_scores(saliency, truth)
    predicted = np.zeros((10, 10), dtype=int)
    predicted[:5, :5], predicted[6:, :5] = 1, 2
    assert scores["false_splits"] == pytest.approx(_entropy_given(predicted, truth))
    assert scores["false_merges"] == pytest.approx(_entropy_given(truth, predicted))
    assert scores["false_splits"] > 2 * scores["false_merges"] > 0
    whole = localisation_scores((truth > 0).astype(float) * 0.7, truth)
    assert whole["false_splits"] == pytest.approx(0.0)
    assert scores["iobb"] == 1.0 and scores["iou"] == pytest.approx(45 / 50)


def test_pointing_game_and_threshold():
    truth = np.zeros((8, 8), dtype=int)
    truth[1:3, 1:3] = 1
    saliency = np.full((8, 8), 0.1)
    saliency[2, 2] = 1.0
    assert localisation_scores(saliency, truth)["pointing_hit"] == 1.0
    saliency[6, 6] = 2.0
    assert localisation_scores(saliency, truth)["pointing_hit"] == 0.0
    assert localisation_scores(np.zeros((8, 8)), truth)["iobb"] == 0.0  # nothing highlighted
    # threshold 0.05 of the peak keeps the whole 0.1 background: the mask covers every pixel
    assert localisation_scores(saliency, truth, threshold=0.05)["iobb"] == pytest.approx(4 / 64)
    with pytest.raises(ValueError, match="differ"):
        localisation_scores(np.zeros((4, 4)), truth)


def test_monai_style_metric_averages_the_samples():
    truth = np.zeros((2, 1, 10, 10), dtype=int)
    truth[:, :, :5, :5] = 1
    maps = np.zeros((2, 1, 10, 10))
    maps[0, 0, :5, :5] = 1.0  # perfect
    maps[1, 0, 5:, 5:] = 1.0  # disjoint
    metric = LocalisationMetric()
    metric(y_pred=torch.from_numpy(maps), y=torch.from_numpy(truth))
    result = metric.aggregate()
    assert result["count"] == 2
    assert result["pointing_hit"] == 0.5 and result["adapted_rand_error"] == pytest.approx(1250 / 6150)
    metric.reset()
    assert metric.aggregate() == {"count": 0}


def test_box_rescaling_matches_the_preprocessing():
    encoder = TabularEncoder().fit([{"age": "40", "sex": "M", "view": "PA", "follow_up": "0"}])
    image = np.zeros((200, 300), dtype=np.float32)  # height 200, width 300
    box = (50.0, 40.0, 60.0, 30.0)  # x, y, w, h
    image[40:70, 50:110] = 1.0
    out = xray_transforms(encoder, 64, with_label=False)({"image": image, "name": "x.png"})["image"][0].numpy()
    rows, cols = np.nonzero(out > 0.5)
    x0, y0, x1, y1 = rescale_box(box, (300, 200), 64)
    assert abs(cols.min() - x0) <= 1 and abs(cols.max() + 1 - x1) <= 1
    assert abs(rows.min() - y0) <= 1 and abs(rows.max() + 1 - y1) <= 1
    labels = box_labels([box], (300, 200), 64)
    assert labels.shape == (64, 64) and set(np.unique(labels)) == {0, 1}
    assert np.mean((labels > 0) == (out > 0.5)) > 0.98
    # NIH: 1024 px frame to a 256 px input scales by 1/4
    assert rescale_box((100, 200, 40, 80), (1024, 1024), 256) == (25.0, 50.0, 35.0, 70.0)


def test_read_boxes_from_the_nih_lists(tmp_path):
    boxes = read_boxes(require(NIH / "bbox.csv"))
    assert len(boxes) == 9 and "Infiltrate" not in set(boxes["finding"])
    assert set(boxes["finding"]) <= set(LABELS) and (boxes["w"] > 0).all()
    full = read_boxes(require(NIH / "meta" / "BBox_List_2017.csv"))
    assert len(full) == 984 and full["name"].nunique() == 880
    bad = tmp_path / "boxes.csv"
    bad.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Mass,1,2,3,4\nb.png,Mass,1,2,-3,4\n")
    with pytest.raises(ValueError, match=r"line 3 \('b.png'\): box w"):
        read_boxes(bad)
    bad.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Tumour,1,2,3,4\n")
    with pytest.raises(ValueError, match="line 2: finding 'Tumour'"):
        read_boxes(bad)


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return MedFusionNet(network_size="tiny", image_size=64).eval()


def test_gradcam_maps_match_the_input_for_every_layer(tiny_net):
    x, tabular = torch.rand(2, 1, 64, 64), torch.zeros(2, NUM_TABULAR_FEATURES)
    assert cam_layers(tiny_net) == {"cnn": "stages.3.cnn", "c2t": "stages.3.c2t.conv", "t2c": "stages.2.t2c"}
    for layer in ("cnn", "c2t", "t2c"):
        for method in ("gradcam", "gradcampp"):
            cam = explanation_map(tiny_net, method, x, 3, tabular, layer)
            assert cam.shape == (2, 1, 64, 64) and float(cam.min()) >= 0 and float(cam.max()) <= 1
    baseline = DenseNet121Tabular().eval()
    assert cam_layers(baseline) == {"cnn": "features"}
    assert gradcam(baseline, x, 0, tabular).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="layer 'c2t' is not in this network"):
        gradcam(baseline, x, 0, tabular, layer="c2t")
    with pytest.raises(ValueError, match="method 'cam'"):
        explanation_map(tiny_net, "cam", x, 0)


class _Brightness(torch.nn.Module):
    """Toy network: a 1x1 convolution (the CAM layer) whose mean is the logit of finding 0."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(1, 2, 1, bias=False)
        torch.nn.init.constant_(self.features.weight, 1.0)

    def forward(self, x, tabular=None):
        logit = self.features(x).mean((1, 2, 3))
        return torch.stack([logit] + [torch.zeros_like(logit)] * (len(LABELS) - 1), 1)


def test_gradcam_is_high_where_the_evidence_is():
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 4:12, 20:28] = 1.0
    for plus in (False, True):
        cam = gradcam(_Brightness(), x, 0, layer="features", plus=plus)[0, 0].numpy()
        assert cam[8, 24] == pytest.approx(1.0) and cam[28, 4] == pytest.approx(0.0)
        assert map_peak(cam) == (7, 23)  # the plateau's pixel nearest its centroid (7.5, 23.5)


def test_lrp_conserves_the_logit_through_densenet():
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3)
            torch.nn.init.zeros_(self.features.class_layers.out.bias)  # no bias: nothing absorbs relevance

        def forward(self, x, tabular=None):
            return self.features(x)

    torch.manual_seed(0)
    net = Wrapped().eval()
    x = torch.rand(2, 1, 64, 64)
    relevance = LayerwiseRelevance(net)(x, 1)
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()
    np.testing.assert_allclose(relevance.sum((1, 2, 3)).numpy(), net(x)[:, 1].detach().numpy(), rtol=1e-3)
    assert not net.training


def test_lrp_on_medfusionnet_is_finite(tiny_net):
    x = torch.rand(2, 1, 64, 64)
    relevance = LayerwiseRelevance(tiny_net)(x, 5, torch.zeros(2, NUM_TABULAR_FEATURES))
    assert relevance.shape == x.shape and torch.isfinite(relevance).all() and relevance.abs().sum() > 0


def _blob_batch(n, rng):
    """64 px images of noise; label 1 (finding 0) when a bright 12 px square is present, at a random place."""
    x = rng.random((n, 1, 64, 64)).astype(np.float32) * 0.3
    y = np.zeros((n, len(LABELS)), dtype=np.float32)
    corners = rng.integers(4, 48, size=(n, 2))
    for i in range(n):
        if i % 2 == 0:
            r, c = corners[i]
            x[i, 0, r : r + 12, c : c + 12] = 1.0
            y[i, 0] = 1.0
    return torch.from_numpy(x), torch.from_numpy(y), corners


@pytest.mark.slow
def test_maps_of_a_trained_tiny_model():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = MedFusionNet(network_size="tiny", image_size=64)
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(120):
        x, y, _ = _blob_batch(16, rng)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.2
    net.eval()
    x, y, corners = _blob_batch(32, np.random.default_rng(5))
    lrp_hits, cam_ranges = 0, []
    for i in range(0, 32, 2):
        truth = np.zeros((64, 64), dtype=int)
        r, c = corners[i]
        truth[r : r + 12, c : c + 12] = 1
        cam_ranges.append(np.ptp(gradcam(net, x[i : i + 1], 0, plus=True)[0, 0].numpy()))
        relevance = LayerwiseRelevance(net)(x[i : i + 1], 0)[0, 0].numpy()
        lrp_hits += localisation_scores(relevance, truth)["pointing_hit"]
    assert np.mean(np.array(cam_ranges) > 0.5) >= 0.75  # Grad-CAM++ maps are not constant
    # the square covers 3.5% of the image: a random peak would hit about 0.6 of 16 times
    assert lrp_hits >= 4


def test_map_similarity_and_random_maps():
    rng = np.random.default_rng(0)
    a = random_map((32, 32), rng, sigma=2)
    assert a.min() == 0 and a.max() == 1
    assert map_similarity(a, a) == pytest.approx(1.0)
    assert map_similarity(a, -a) == pytest.approx(-1.0)
    assert abs(map_similarity(a, random_map((32, 32), rng, sigma=2))) < 0.5
    assert map_similarity(a, np.zeros((32, 32))) == 0.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_net):
    return write_tiny_run(tmp_path_factory.mktemp("run"), tiny_net)


def test_explain_workflow_on_the_boxed_nih_images(model_dir, tmp_path):
    from medfusionnet.explain.workflow import explain_images

    boxes = read_boxes(require(NIH / "bbox.csv")).iloc[[0, 3, 4]]  # Cardiomegaly, Mass, Nodule
    images = tmp_path / "images"
    images.mkdir()
    for name in boxes["name"]:
        (images / name).symlink_to(require(NIH / "images_full" / name))
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "explain"
    summary = explain_images(
        str(model_dir),
        str(images),
        str(out),
        str(NIH / "labels.csv"),
        findings=["Mass"],
        methods=("gradcam", "lrp"),
        cam_layers=("cnn", "t2c"),
        boxes_csv=str(NIH / "bbox.csv"),
        random_maps=2,
    )
    assert summary["skipped"] == ["broken.png"]
    rows = pd.read_csv(out / "explanations.csv")
    # every image: Mass plus its boxed finding (once when that is Mass), three maps each
    assert len(rows) == 3 * 5 and set(rows["method"]) == {"gradcam", "lrp"}
    first = np.load(out / rows["map"].iloc[0])
    assert first.shape == (64, 64) and (out / rows["overlay"].iloc[0]).is_file()
    assert rows["randomised_spearman"].between(-1, 1).all()
    loc = pd.read_csv(out / "localisation.csv")
    assert len(loc) == 3 * (3 + 2)  # 3 boxes x (gradcam cnn, gradcam t2c, lrp + 2 random maps)
    assert set(summary["localisation"]) == {"gradcam:cnn", "gradcam:t2c", "lrp:input", "random"}
    assert summary["localisation"]["random"]["maps"] == 6
    assert json.loads((out / "summary.json").read_text())["maps"] == len(rows)
    with pytest.raises(ValueError, match="finding"):
        explain_images(str(model_dir), str(images), str(out), findings=["Tumour"])


def test_localisation_handler_scores_boxed_images_in_an_evaluator(tiny_net, tmp_path):
    from ignite.engine import Engine, Events

    from medfusionnet.explain.workflow import LocalisationHandler

    boxes = tmp_path / "boxes.csv"
    boxes.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Mass,256,256,256,256\n"
        "a.png,Nodule,0,0,128,128\nc.png,Infiltrate,0,0,512,512\n"
    )
    batch = [
        {"image": torch.rand(1, 64, 64), "tabular": torch.zeros(NUM_TABULAR_FEATURES), "name": name}
        for name in ("a.png", "b.png")
    ]

    def step(engine, _):
        engine.state.batch = batch

    engine = Engine(step)
    engine.network = tiny_net
    engine.state.device = torch.device("cpu")
    handler = LocalisationHandler(str(boxes), str(tmp_path / "eval"), image_size=64, method="lrp", random_maps=4)
    handler.attach(engine)
    done = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: done.append(dict(e.state.metrics)))
    engine.run([0, 1], max_epochs=1)  # two iterations over the same batch: a.png twice
    assert done[0]["localisation_count"] == 4 and done[0]["random_count"] == 16  # Mass and Nodule of a.png, twice
    report = json.loads((tmp_path / "eval" / "localisation.json").read_text())
    assert report["method"] == "lrp" and report["scores"]["count"] == 4
    assert 0 <= report["random_baseline"]["pointing_hit"] <= 1
