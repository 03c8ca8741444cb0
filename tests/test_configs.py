"""The configs' layering: train.yaml and inference.yaml each run alone and share one section word for word; the
overlays add only their own keys; the workflows run from any working directory."""

import re

import pytest
import torch
import yaml
from conftest import REPO, write_tiny_run

import medfusionnet

CONFIGS = REPO / "configs"
SHARED = re.compile(r"^# ---- shared with .*?\n(.*?)\n# ----", re.S | re.M)


def _load(name):
    return yaml.safe_load((CONFIGS / name).read_text())


def _shared_section(name):
    match = SHARED.search((CONFIGS / name).read_text())
    assert match, f"{name} has no '# ---- shared with' section"
    return yaml.safe_load(match.group(1))


def test_train_and_inference_share_one_section_word_for_word():
    train, inference = _shared_section("train.yaml"), _shared_section("inference.yaml")
    assert train == inference
    assert {"network_def", "device", "postprocessing", "prepare_batch", "fpn", "baseline_path"} <= set(train)
    for name in ("train.yaml", "inference.yaml"):  # the section is the only definition of its keys in each file
        whole = _load(name)
        assert all(whole[k] == v for k, v in train.items())
    trained, default = _load("train.yaml")["network_args"], _load("inference.yaml")["default_network_args"]
    trained["medfusionnet"]["label_counts"] = trained["medfusionnet"]["tabular_fields"] = None  # learned in training
    trained["num_tabular_features"] = default["num_tabular_features"]
    assert trained == default  # an untrained inference run builds the same network


def test_overlays_add_only_their_own_keys():
    train, inference = _load("train.yaml"), _load("inference.yaml")
    for overlay, base in (("evaluate.yaml", train), ("multi_gpu_train.yaml", train), ("explain.yaml", inference)):
        keys = _load(overlay)
        repeated = [k for k in keys if k in base and keys[k] == base[k]]
        assert not repeated, f"{overlay} repeats {repeated} of its base unchanged"


def test_no_file_macros_and_no_long_expressions():
    for path in sorted(CONFIGS.glob("*.yaml")):
        text = path.read_text()
        assert "%configs/" not in text, path.name  # MONAI resolves such a path against the working directory
        for line in text.splitlines():
            expression = re.search(r"\"\$(.*?)\"\s*(#.*)?$", line)
            if expression:
                assert len(expression.group(1)) <= 100, f"{path.name}: {line.strip()}"


# MONAI warns on every config file it parses that "$" values are eval()ed; this one is the bundle's own
@pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
def test_inference_has_the_properties_monai_requires(tmp_path, monkeypatch):
    from monai.bundle import create_workflow

    from medfusionnet.data.demo import make_demo_dataset

    run = write_tiny_run(tmp_path / "run")
    images = make_demo_dataset(str(tmp_path / "demo"), num_patients=2) + "/images"
    monkeypatch.chdir(tmp_path)  # anywhere but the bundle root
    workflow = create_workflow(
        workflow_type="inference",
        config_file=str(CONFIGS / "inference.yaml"),
        meta_file=str(REPO / "metadata.json"),
        bundle_root=str(REPO),
        output_dir=str(run),
        input_dir=images,
    )
    assert workflow.check_properties() == []
    assert workflow.dataset_dir == images and len(workflow.dataset) > 0
    tabular = torch.zeros(1, medfusionnet.NUM_TABULAR_FEATURES)
    assert workflow.network_def.eval()(torch.rand(1, 1, 64, 64), tabular).shape == (1, 14)


def test_train_and_its_overlays_parse_from_another_folder(tmp_path, monkeypatch):
    from monai.bundle import ConfigParser

    run = write_tiny_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    for files in (["train.yaml"], ["train.yaml", "evaluate.yaml"], ["train.yaml", "multi_gpu_train.yaml"]):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        parser.update({"bundle_root": str(REPO), "network_size": "tiny"})
        parser.parse()
        assert parser.get_parsed_content("demo_dir") == str(REPO / "demo_data")
        parser["output_dir"] = str(run)  # evaluate.yaml reads the trained architecture from a run
        parser.parse()
        assert isinstance(parser.get_parsed_content("network_def"), torch.nn.Module)


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("curriculum_epochs", -1)])
def test_the_named_settings_checks_name_a_bad_key(tmp_path, key, value):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({"bundle_root": str(tmp_path), key: value})
    parser.parse()
    with pytest.raises(Exception, match=key):
        for check in ("training_settings", "derived_settings"):
            parser.get_parsed_content(check)
