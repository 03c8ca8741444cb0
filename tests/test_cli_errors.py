"""A failed ``python -m monai.bundle run`` ends with the bundle's own message, naming what the user typed."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import NIH, REPO, require, write_tiny_run

from medfusionnet import cli_errors


def _raise_inside_package():
    from medfusionnet.engine.settings import check_training_settings

    check_training_settings(batch_size=0)


def test_the_bundle_error_is_found_behind_monai_wrappers():
    try:
        try:
            _raise_inside_package()
        except ValueError as e:
            raise RuntimeError("Failed to instantiate component with keywords: ...") from e
    except RuntimeError as outer:
        own = cli_errors.bundle_error(outer)
        assert isinstance(own, ValueError) and "batch_size=0" in str(own)
        stream = io.StringIO()
        cli_errors.report(type(outer), outer, outer.__traceback__, stream)
        lines = stream.getvalue().splitlines()
        assert lines[-1] == f"ValueError: {own}" and "Failed to instantiate" not in stream.getvalue()
    # an error raised outside the package is printed whole, as Python prints it
    try:
        try:
            int("abc")
        except ValueError as e:
            raise RuntimeError("wrapper") from e
    except RuntimeError as outer:
        assert cli_errors.bundle_error(outer) is None
        stream = io.StringIO()
        cli_errors.report(type(outer), outer, outer.__traceback__, stream)
        assert "invalid literal" in stream.getvalue() and stream.getvalue().splitlines()[-1] == "RuntimeError: wrapper"
    assert cli_errors.is_bundle_command(os.path.join("site-packages", "monai", "bundle", "__main__.py"))
    assert not cli_errors.is_bundle_command("/usr/bin/pytest")


def _last_stderr_line(tmp_path, *args: str) -> str:
    """Run the bundle command from a folder that is not the bundle root and return the last line of stderr."""
    env = {k: v for k, v in os.environ.items() if k != "MEDFUSIONNET_FULL_TRACEBACK"}
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args, "--bundle_root", str(REPO)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0, done.stdout[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) < 20, done.stderr  # the bundle's error alone, not MONAI's wrappers and expression dumps
    return lines[-1]


@pytest.mark.slow
def test_six_mistakes_end_with_one_clear_line(tmp_path):
    train = ["training", "--config_file", str(REPO / "configs" / "train.yaml"), "--output_dir", str(tmp_path / "run")]
    assert _last_stderr_line(tmp_path, *train, "--image_size", "100") == (
        "ValueError: image_size=100 is not valid for network_name='medfusionnet': use a multiple of 32 (e.g. 96 or 128)"
    )
    assert _last_stderr_line(tmp_path, *train, "--batch_size", "abc") == (
        "ValueError: batch_size='abc' (str) is not valid: use an integer >= 1"
    )
    assert _last_stderr_line(tmp_path, *train, "--network_name", "densenet12").startswith(
        "ValueError: network_name='densenet12' (str) is not valid: use one of ["
    )
    assert _last_stderr_line(tmp_path, *train, "--dataset_dir", str(tmp_path / "nih")).startswith(
        f"FileNotFoundError: dataset_dir '{tmp_path / 'nih'}' is not a folder: point --dataset_dir at"
    )
    # a labels CSV without the patient-age column
    csv = tmp_path / "labels.csv"
    pd.read_csv(require(NIH / "labels.csv")).drop(columns=["Patient Age"]).to_csv(csv, index=False)
    line = _last_stderr_line(
        tmp_path, *train, "--dataset_dir", str(NIH), "--labels_csv", str(csv), "--images_dir", str(NIH / "images_256")
    )
    assert line.startswith("ValueError: ") and str(csv) in line and "Patient Age" in line
    # inference with a checkpoint that is not a state dict
    run = write_tiny_run(tmp_path / "tiny")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    infer = ["--config_file", str(REPO / "configs" / "inference.yaml"), "--output_dir", str(run)]
    line = _last_stderr_line(tmp_path, *infer, "--ckpt_path", str(notes), "--input_dir", str(NIH / "images_256"))
    assert line.startswith(f"ValueError: checkpoint {notes} cannot be read as a state dict: Weights only load failed")
