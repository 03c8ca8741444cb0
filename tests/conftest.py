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


TINY_NETWORK_ARGS = {"name": "medfusionnet", "network_size": "tiny", "image_size": 64}


def write_tiny_run(out: Path, network=None) -> Path:
    """A training run's output folder (model.pt, run_settings.json, tabular_encoder.json) for a tiny 64 px
    MedFusionNet: ``network``'s weights, or an untrained one seeded with 0."""
    import torch

    from medfusionnet import TabularEncoder, create_network
    from medfusionnet.engine.run_settings import save_run_settings

    if network is None:
        torch.manual_seed(0)
        network = create_network(**TINY_NETWORK_ARGS)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), out / "model.pt")
    save_run_settings(str(out), image_size=64, network_args=dict(TINY_NETWORK_ARGS))
    records = [
        {"age": "40", "sex": "M", "view": "PA", "follow_up": "0"},
        {"age": "60", "sex": "F", "view": "AP", "follow_up": "2"},
    ]
    TabularEncoder().fit(records).save(str(out / "tabular_encoder.json"))
    return out
