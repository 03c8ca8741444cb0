"""Shared fixtures: paths of the real data beside the checkout (``../shared/data``), read in place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDFUSIONNET_TEST_DATA", REPO.parent / "shared" / "data"))
NIH = DATA / "nih"
DICOM_DIR = DATA / "dicom"


def require(path: Path) -> Path:
    """Skip the calling test when the real data file or folder is not present."""
    if not path.exists():
        pytest.skip(f"real test data not found: {path}")
    return path


@pytest.fixture
def nih_dir() -> Path:
    return require(NIH)


@pytest.fixture
def dicom_files() -> list[Path]:
    return sorted(require(DICOM_DIR).glob("*.dcm"))
