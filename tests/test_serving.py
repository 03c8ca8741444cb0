"""One X-ray at a time (`medfusionnet.serving`): maps back on the X-ray's grid, the label map, and agreement with
the inference workflow's decisions and report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, write_tiny_run

from medfusionnet.constants import LABELS
from medfusionnet.serving import XrayPredictor, finding_regions, label_map, to_xray_frame


def test_to_xray_frame_cuts_the_padding_and_resizes():
    # a 200 x 100 X-ray at 64 px: resized to 64 x 32, centre-padded by 16 rows above and below
    cam = np.zeros((64, 64), dtype=np.float32)
    cam[16:48, :32] = 1.0  # the left half of the X-ray's part
    back = to_xray_frame(cam, 64, (200, 100))
    assert back.shape == (100, 200)
    assert back[:, :95].min() == pytest.approx(1.0)
    assert back[:, 105:].max() == pytest.approx(0.0)
    # the padding (all zero here) never reaches the X-ray: the top and bottom rows come from the map's rows 16 / 47
    assert back[0, :95].min() == pytest.approx(1.0) and back[-1, :95].min() == pytest.approx(1.0)


def test_label_map_values_and_overlap():
    a = np.array([[0.9, 0.6, 0.1], [0.2, 0.0, 0.0]], dtype=np.float32)
    b = np.array([[0.5, 0.7, 0.0], [0.8, 0.0, 0.4]], dtype=np.float32)
    labels = label_map({"Mass": a, "Hernia": b}, 0.5)
    mass, hernia = LABELS.index("Mass") + 1, LABELS.index("Hernia") + 1
    # (0,0) both inside, Mass stronger; (0,1) both inside, Hernia stronger; (1,0) Hernia only; (1,2) below 0.5
    assert labels.tolist() == [[mass, hernia, 0], [hernia, 0, 0]]
    assert labels.dtype == np.uint8
    assert label_map({}, 0.5, (2, 3)).tolist() == [[0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="shape"):
        label_map({}, 0.5)
    regions = finding_regions({"Mass": a}, 0.6)
    assert regions["Mass"].tolist() == [[True, True, False], [False, False, False]]
    with pytest.raises(ValueError, match="cam_threshold"):
        finding_regions({"Mass": a}, 0.0)


@pytest.fixture(scope="module")
def inference_run(tmp_path_factory, request):
    """A tiny run, and the bundle's inference over the two shared DICOMs (decisions.json and decisions.html)."""
    dicom_dir = REPO.parent / "shared" / "data" / "dicom"
    if not dicom_dir.exists():
        pytest.skip(f"real test data not found: {dicom_dir}")
    run = write_tiny_run(tmp_path_factory.mktemp("serving") / "run")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(REPO / "configs" / "inference.yaml")]
    command += [
        "--bundle_root",
        str(REPO),
        "--output_dir",
        str(run),
        "--input_dir",
        str(dicom_dir),
        "--num_workers",
        "0",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "bundle")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    return run, dicom_dir


def test_predictor_answers_as_inference_does(inference_run):
    run, dicom_dir = inference_run
    with open(run / "inference" / "decisions.json") as f:
        document = json.load(f)
    predictor = XrayPredictor(str(run))
    for item in document["images"]:
        prediction = predictor.predict(str(dicom_dir / item["image"]))
        assert prediction.result["tier"] == item["tier"]
        assert prediction.result["findings"] == item["findings"]
        for label in LABELS:
            assert prediction.result["probabilities"][label] == pytest.approx(item["probabilities"][label], abs=1e-5)
        assert prediction.result["thresholds"] == document["thresholds"]
        # the header's fields are the tabular inputs a DICOM brings
        assert prediction.fields.get("sex") == "M" and "age" in prediction.fields


def test_inference_writes_the_html_report(inference_run):
    run, _ = inference_run
    out = run / "inference"
    with open(out / "decisions.json") as f:
        document = json.load(f)
    index = (out / "decisions.html").read_text()
    for item in document["images"]:
        stem = item["image"]
        page = out / "report" / f"{stem}.html"
        assert page.is_file() and f'href="report/{stem}.html"' in index
        text = page.read_text()
        # one overlay per positive finding, and its picture file beside the page
        for finding in item["findings"]:
            assert (out / "report" / f"{stem}_{finding}.jpg").is_file()
            assert f'src="{stem}_{finding}.jpg"' in text
        assert text.count("<rect") == len(LABELS)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("MEDFUSIONNET_REQUIRE_CHROMIUM"),
    reason="chromium not installed (Debian package chromium; .ci/run installs it)",
)
def test_report_renders_in_headless_chromium(inference_run, tmp_path):
    from PIL import Image

    assert CHROMIUM, "MEDFUSIONNET_REQUIRE_CHROMIUM is set but chromium is not installed"
    run, _ = inference_run
    out = run / "inference"
    with open(out / "decisions.json") as f:
        item = json.load(f)["images"][0]
    page = out / "report" / f"{item['image']}.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]

    def dom(path):
        done = subprocess.run(
            [CHROMIUM, *flags, "--virtual-time-budget=3000", "--dump-dom", path.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    expected = 1 + len(item["findings"])
    body = dom(page)
    assert f'data-images-loaded="{expected}"' in body and 'data-images-broken="0"' in body
    shot = tmp_path / "page.png"
    done = subprocess.run(
        [CHROMIUM, *flags, "--window-size=1000,1400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1400, 1000)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.05  # X-rays and text drawn, not a blank page
    # the check can fail: a page whose picture is gone is reported broken
    broken = tmp_path / "broken"
    shutil.copytree(out / "report", broken)
    os.remove(broken / f"{item['image']}_xray.jpg")
    body = dom(broken / page.name)
    assert 'data-images-broken="1"' in body and f'data-images-loaded="{expected - 1}"' in body
