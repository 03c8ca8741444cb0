import json

from conftest import REPO

import medfusionnet
from medfusionnet.constants import LABELS
from medfusionnet.data.tabular import FEATURE_NAMES


def _metadata():
    with open(REPO / "metadata.json") as f:
        return json.load(f)


def test_labels_match_metadata_channel_def():
    channel_def = _metadata()["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [channel_def[str(i)] for i in range(len(channel_def))] == list(LABELS)
    post = _metadata()["network_data_format"]["post_processed_outputs"]["pred"]["channel_def"]
    assert post == channel_def


def test_inputs_image_first_and_tabular_layout():
    inputs = _metadata()["network_data_format"]["inputs"]
    assert list(inputs)[:2] == ["image", "tabular"]
    assert inputs["image"]["num_channels"] == 1 and inputs["image"]["value_range"] == [0, 1]
    assert inputs["tabular"]["num_channels"] == medfusionnet.NUM_TABULAR_FEATURES
    assert [inputs["tabular"]["channel_def"][str(i)] for i in range(len(FEATURE_NAMES))] == list(FEATURE_NAMES)


def test_default_metadata_lookup_finds_the_same_file():
    lookup = REPO / "configs" / "metadata.json"
    assert lookup.resolve() == (REPO / "metadata.json").resolve()


def test_versions_agree():
    assert _metadata()["version"] == medfusionnet.__version__
    assert medfusionnet.__version__ in _metadata()["changelog"]
