"""Workflow runs through ``python -m monai.bundle``, exactly as the README documents them."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, require

import medfusionnet
from medfusionnet.data.nih import read_nih_csv, read_split_list
from medfusionnet.data.tabular import NIH_FIELDS
from medfusionnet.risk import two_stage


def bundle(*args, timeout=900):
    """Run ``python -m monai.bundle <args>`` from the repository root; fail with its output on error."""
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def train_on_demo(tmp_path, out, max_epochs, *overrides):
    """The training workflow on the demo set generated under ``tmp_path``, writing to ``out``; returns its log."""
    config = ["--config_file", "configs/train.yaml", "--output_dir", out, "--demo_dir", tmp_path / "demo"]
    return bundle("run", "training", *config, "--max_epochs", max_epochs, "--num_workers", 0, *overrides)


def export_torchscript(out):
    """``ckpt_export`` of the run in ``out`` to ``out/model.ts``, with the metadata and inference config embedded."""
    ckpt = ["--ckpt_file", out / "model.pt", "--meta_file", "metadata.json", "--config_file", "configs/inference.yaml"]
    bundle("ckpt_export", "network_def", "--filepath", out / "model.ts", *ckpt, "--output_dir", out)


def nih_256(nih_dir):
    """Overrides that train on the shared NIH images at 256 px with their labels CSV."""
    return ["--dataset_dir", nih_dir, "--labels_csv", nih_dir / "labels.csv", "--images_dir", nih_dir / "images_256"]


def _script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _check_training_outputs(out, num_val_images_min=1):
    state = torch.load(out / "model.pt", weights_only=True)  # a plain state dict of the best epoch
    net = medfusionnet.create_network(**json.loads((out / "run_settings.json").read_text())["network_args"])
    net.load_state_dict(state)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_class"]) == set(medfusionnet.LABELS)
    assert metrics["num_images"] >= num_val_images_min and 0 <= metrics["mean"]["auc"] <= 1
    assert set(json.loads((out / "thresholds.json").read_text())) == set(medfusionnet.LABELS)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))
    assert (out / "tabular_encoder.json").is_file()
    return metrics


def test_verify_metadata_and_network():
    schema = require(REPO.parent / "shared" / "schema" / "meta_schema_20240725.json")
    assert "verified with no error" in bundle("verify_metadata", "--meta_file", "metadata.json", "--filepath", schema)
    log = bundle(
        "verify_net_in_out", "network_def", "--meta_file", "metadata.json", "--config_file", "configs/inference.yaml"
    )
    assert "verified with no error" in log


def test_verify_net_in_out_with_tabular_input(monkeypatch, tmp_path):
    from monai.bundle import verify_net_in_out

    monkeypatch.chdir(tmp_path)  # any working directory: the configs name no file relative to it
    for tabular in (None, torch.zeros(1, medfusionnet.NUM_TABULAR_FEATURES)):
        verify_net_in_out(
            "network_def",
            meta_file=str(REPO / "metadata.json"),
            config_file=str(REPO / "configs" / "inference.yaml"),
            bundle_root=str(REPO),
            extra_forward_args={"tabular": tabular},
            output_dir=str(REPO / "no_such_run"),
        )


@pytest.mark.slow
def test_demo_train_evaluate_infer(tmp_path):
    out = tmp_path / "run"
    log = train_on_demo(tmp_path, out, 2, "--network_size", "tiny")  # the small size keeps the test short
    assert "SYNTHETIC" in log and "Cannot find the metadata" not in log
    metrics = _check_training_outputs(out)
    assert metrics["mean"]["auc"] > 0.6  # the synthetic findings are learnable within two epochs
    assert "val_mean_auc" in log and "val split, best epoch so far (2): mean AUC" in log
    log = bundle(
        "run",
        "--config_file",
        "['configs/train.yaml','configs/evaluate.yaml']",
        "--output_dir",
        out,
        "--demo_dir",
        tmp_path / "demo",
        "--num_workers",
        0,
    )
    report = json.loads((out / "eval" / "metrics.json").read_text())
    # one pass over the test split: named as such, with no "best" epoch and no validation metric names
    assert f"test split: mean AUC {report['mean']['auc']:.4f} over {report['num_images']} images" in log
    assert "val_mean" not in log and "best" not in log.lower()
    assert report["thresholds_chosen_on_this_data"] is False
    assert all(
        report["per_class"][k]["threshold"] == v for k, v in json.loads((out / "thresholds.json").read_text()).items()
    )
    assert (out / "eval" / "roc.png").stat().st_size > 0
    assert len(_rows(out / "eval" / "predictions.csv")) == report["num_images"]
    # the data's provenance: saved with the model, repeated by the reports and the decisions
    data = json.loads((out / "run_settings.json").read_text())["data"]
    assert (
        data["synthetic"] is True
        and data["split"] == "official"
        and data["images"]["train"] == metrics["data"]["images"]["train"]
    )
    assert metrics["data"]["evaluated"] == "val" and report["data"]["evaluated"] == "test"
    assert report["data"]["trained_on"] == data and report["num_images"] == data["images"]["test"]
    infer = ["run", "--config_file", "configs/inference.yaml", "--output_dir", out, "--num_workers", 0]
    images = tmp_path / "demo" / "images"
    log = bundle(*infer, "--input_dir", images)
    assert "trained on the SYNTHETIC demo set" in log
    decisions = json.loads((out / "inference" / "decisions.json").read_text())
    assert decisions["model_trained_on"] == data
    # a second run keeps the first run's outputs and says where it writes
    log = bundle(*infer, "--input_dir", images)
    assert f"this run writes to {out / 'inference'}_2" in log and (out / "inference_2" / "decisions.json").is_file()

    # TorchScript export of the trained model matches eager mode
    export_torchscript(out)
    scripted = torch.jit.load(str(out / "model.ts"))
    settings = json.loads((out / "run_settings.json").read_text())
    eager = medfusionnet.create_network(**settings["network_args"]).eval()
    eager.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    image = torch.rand(3, 1, settings["image_size"], settings["image_size"])
    tabular = torch.zeros(3, medfusionnet.NUM_TABULAR_FEATURES)
    with torch.no_grad():
        assert (scripted(image, tabular) - eager(image, tabular)).abs().max() < 1e-4
        assert (scripted(image) - eager(image)).abs().max() < 1e-4
    # the parity script on real images
    nih = REPO.parent / "shared" / "data" / "nih"
    if (nih / "images_full").is_dir():
        # the ONNX export (no TorchScript) is checked beside it with onnxruntime
        assert _script("export_onnx").main(["--model_dir", str(out)]) == 0
        check = _script("export_check")
        assert (
            check.main(
                [
                    "--model_dir",
                    str(out),
                    "--input_dir",
                    str(nih / "images_full"),
                    "--tabular_csv",
                    str(nih / "labels.csv"),
                    "--limit",
                    "16",
                    "--batch_size",
                    "8",
                    "--repeats",
                    "1",
                    "--output",
                    str(out / "export_check.json"),
                ]
            )
            == 0
        )
        result = json.loads((out / "export_check.json").read_text())
        assert result["images"] == 16 and result["embedded"] == {"metadata.json": True, "inference.json": True}
        assert max(result["max_abs_logit_difference"].values()) < 1e-4
        assert set(result["max_abs_logit_difference"]) == {"with_tabular", "without_tabular", "onnx_with_tabular"}
        assert result["onnx_embedded"] == ["labels", "metadata.json", "run_settings.json"]
        assert result["speed"]["onnx"]["images_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["--network_name", "densenet121"],
        ["--network_size", "tiny", "--fusion", "concat", "--branches", "['cnn','relational']", "--fpn", "False"],
        ["--network_size", "tiny", "--interaction", "False", "--use_tabular", "False", "--class_reweighting", "False"],
        ["--network_size", "tiny", "--grad_checkpointing", "True", "--channels_last", "True"],  # training options
        ["--network_size", "tiny", "--aux_loss_weight", "0.3", "--gate_lr_scale", "30", "--fusion_lr_scale", "2"],
    ],
)
def test_networks_and_ablations_selected_by_overrides(tmp_path, overrides):
    out = tmp_path / "run"
    train_on_demo(tmp_path, out, 1, *overrides)
    args = json.loads((out / "run_settings.json").read_text())["network_args"]
    for flag, value in zip(overrides[::2], overrides[1::2]):
        key = {"--network_name": "name"}.get(flag, flag[2:])
        if key in ("grad_checkpointing", "channels_last", "aux_loss_weight", "gate_lr_scale", "fusion_lr_scale"):
            continue  # how to train, not what to build: not saved with the network
        saved = args[key] if key in args else args["medfusionnet"][key]  # MedFusionNet's switches: its own group
        assert str(saved).replace(" ", "").replace('"', "'") == value
    _check_training_outputs(out)


@pytest.mark.slow
def test_real_nih_train_evaluate_infer(nih_dir, dicom_files, tmp_path):
    # the paper's pipeline: a risk model of the NIH metadata gives the network its tabular tokens (stage-1 features
    # and stage-2 probabilities), and every later workflow rebuilds that input from the run folder alone
    frame = read_nih_csv(nih_dir / "labels.csv")
    x, y_table = two_stage.nih_tables(frame)
    params = {**two_stage.FOREST_PARAMS, "n_estimators": 20, "top_n": 2}
    train = frame["name"].isin(read_split_list(nih_dir / "meta" / "train_val_list.txt")).to_numpy()  # no test image
    risk = {
        o: two_stage.TwoStageRiskModel(**params).fit(x[train], y_table[o][train]) for o in ("Effusion", "Infiltration")
    }
    two_stage.save_models(tmp_path / "risk_model.json", risk, tabular_fields=NIH_FIELDS)
    expected_risk = dict(zip(frame["name"], risk["Effusion"].predict_proba(x)[:, 1]))
    out = tmp_path / "run"
    bundle(
        "run",
        "training",
        "--config_file",
        "configs/train.yaml",
        *nih_256(nih_dir),
        "--image_size",
        64,
        "--max_epochs",
        1,
        "--output_dir",
        out,
        "--num_workers",
        0,
        "--risk_model",
        tmp_path / "risk_model.json",
    )
    metrics = _check_training_outputs(out)
    settings = json.loads((out / "run_settings.json").read_text())
    encoder = medfusionnet.TabularEncoder.load(str(out / "tabular_encoder.json"))
    assert encoder.feature_names[-3:] == ["risk_Effusion", "risk_Infiltration", "risk_missing"]
    assert settings["network_args"]["num_tabular_features"] == encoder.num_features
    assert [tuple(f) for f in settings["network_args"]["medfusionnet"]["tabular_fields"]] == encoder.field_slices()
    assert json.loads((out / "risk_model.json").read_text())["outcomes"].keys() == risk.keys()
    assert sum(v["auc"] is not None for v in metrics["per_class"].values()) >= 12
    bundle(
        "run",
        "--config_file",
        "['configs/train.yaml','configs/evaluate.yaml']",
        *nih_256(nih_dir),
        "--output_dir",
        out,
        "--num_workers",
        0,
        "--boxes_csv",
        nih_dir / "bbox.csv",
    )
    report = json.loads((out / "eval" / "metrics.json").read_text())
    assert report["num_images"] == 56  # the official test images among the 469
    assert 0 <= report["calibration"]["expected_calibration_error_calibrated"] <= 1
    localisation = json.loads((out / "eval" / "localisation.json").read_text())
    assert localisation["scores"]["count"] == 9  # every boxed image is an official test image
    assert localisation["random_baseline"]["count"] == 9 * 20
    assert 0 <= localisation["scores"]["pointing_hit"] <= 1
    explain_dir = tmp_path / "explain"
    bundle(
        "run",
        "--config_file",
        "['configs/inference.yaml','configs/explain.yaml']",
        "--output_dir",
        out,
        "--explain_dir",
        explain_dir,
        "--input_dir",
        nih_dir / "images_full" / "00015649_000.png",
        "--boxes_csv",
        nih_dir / "bbox.csv",
        "--tabular_csv",
        nih_dir / "labels.csv",
    )
    summary = json.loads((explain_dir / "summary.json").read_text())
    assert summary["localisation"]["gradcam:cnn"]["maps"] == 1 and "lrp:input" in summary["randomisation_check"]
    # the run's risk model: every decision also gets the patient's tabular risk and the combined tier
    for folder, expected in ((nih_dir / "images_full", 150), (dicom_files[0].parent, 2)):
        infer_dir = tmp_path / folder.name
        bundle(
            "run",
            "--config_file",
            "configs/inference.yaml",
            "--input_dir",
            folder,
            "--output_dir",
            out,
            "--infer_dir",
            infer_dir,
            "--tabular_csv",
            nih_dir / "labels.csv",
            "--num_workers",
            0,
        )
        rows = _rows(infer_dir / "predictions.csv")
        assert len(rows) == expected
        decisions = json.loads((infer_dir / "decisions.json").read_text())
        assert decisions["calibrated"] and len(decisions["images"]) == expected
        assert {item["tier"] for item in decisions["images"]} <= {"low", "medium", "high"}
        assert decisions["risk_model"]["outcomes"] == ["Effusion", "Infiltration"] and "combined_rule" in decisions
        for item in decisions["images"]:
            tabular = item["tabular_risk"]
            assert tabular["status"] == "ok" and set(tabular["outcomes"]) == {"Effusion", "Infiltration"}
            assert item["combined_tier"] == max(item["tier"], tabular["level"], key=["low", "medium", "high"].index)
            if item["image"] in expected_risk:  # an NIH image: its labels.csv row, as the risk model saw it
                probability = tabular["outcomes"]["Effusion"]["probability"]
                assert probability == pytest.approx(expected_risk[item["image"]], abs=1e-6)
        assert list(rows[0])[1:] == list(medfusionnet.LABELS)
        assert all(0 <= float(r[label]) <= 1 for r in rows for label in medfusionnet.LABELS)
    # TorchScript export and the zoo package of the run with the risk model's input
    export_torchscript(out)
    scripted, eager = torch.jit.load(str(out / "model.ts")), medfusionnet.create_network(**settings["network_args"])
    eager.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    image = torch.rand(2, 1, 64, 64)
    tabular = torch.from_numpy(encoder.transform(frame.to_dict("records")[:2]))
    with torch.no_grad():
        assert (scripted(image, tabular) - eager.eval()(image, tabular)).abs().max() < 1e-4
    zipped = _script("package_bundle").package(str(out), str(tmp_path / "dist"))
    assert os.path.isfile(zipped)
    packaged = tmp_path / "dist" / _script("package_bundle").NAME / "models"
    assert (packaged / "risk_model.json").is_file() and (packaged / "tabular_encoder.json").is_file()


@pytest.mark.slow
def test_two_process_cpu_training_with_torchrun(nih_dir, tmp_path):
    """Two gloo processes train on real NIH images; the validation metrics they gather equal a single-process
    evaluation of the saved checkpoint on the same split."""
    out = tmp_path / "ddp"
    data = [
        *nih_256(nih_dir),
        "--image_size",
        64,
        "--output_dir",
        out,
        "--num_workers",
        0,
        "--network_size",
        "tiny",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            "['configs/train.yaml','configs/multi_gpu_train.yaml']",
            "--max_epochs",
            "1",
            *map(str, data),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    gathered = _check_training_outputs(out)  # the state dict has no DistributedDataParallel "module." prefix
    bundle("run", "--config_file", "['configs/train.yaml','configs/evaluate.yaml']", "--eval_split", "val", *data)
    single = json.loads((out / "eval" / "metrics.json").read_text())
    # each rank validated half of the split; gathered, every image counts once
    assert gathered["num_images"] == single["num_images"] > 0
    assert gathered["mean"]["auc"] == pytest.approx(single["mean"]["auc"], abs=1e-6)
    for label in medfusionnet.LABELS:
        for key in ("auc", "f1", "gmean"):
            want = single["per_class"][label][key]
            assert gathered["per_class"][label][key] == (None if want is None else pytest.approx(want, abs=1e-6))


def test_cnn_weights_helper(tmp_path):
    from monai.networks.nets import DenseNet121

    from medfusionnet.engine.training import with_cnn_weights

    path = tmp_path / "densenet.pt"
    reference = DenseNet121(spatial_dims=2, in_channels=1, out_channels=14)
    torch.save(reference.state_dict(), path)
    net = with_cnn_weights(medfusionnet.create_network("medfusionnet"), str(path))
    torch.testing.assert_close(net.stem[0].weight, reference.features.conv0.weight)
    with pytest.raises(ValueError, match="no DenseNet CNN branch"):
        with_cnn_weights(medfusionnet.create_network("densenet121"), str(path))


def test_a_checkpoint_of_another_network_is_refused_by_name(tmp_path):
    from medfusionnet.engine.checkpoints import check_checkpoint

    net = medfusionnet.create_network("medfusionnet", network_size="tiny", image_size=64)
    torch.save(net.state_dict(), tmp_path / "same.pt")
    check_checkpoint(str(tmp_path / "same.pt"), net)
    other_labels = medfusionnet.create_network("medfusionnet", network_size="tiny", image_size=64, num_classes=15)
    torch.save(other_labels.state_dict(), tmp_path / "fifteen.pt")
    with pytest.raises(ValueError, match=r"fifteen.pt.*differ in shape.*\(15,"):
        check_checkpoint(str(tmp_path / "fifteen.pt"), net)
    torch.save(medfusionnet.create_network("densenet121").state_dict(), tmp_path / "densenet.pt")
    with pytest.raises(ValueError, match=r"densenet.pt.*absent from the checkpoint"):
        check_checkpoint(str(tmp_path / "densenet.pt"), net)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        check_checkpoint(str(tmp_path / "missing.pt"), net)
    # not a state dict: a pickled whole network (refused without running it), text, a list
    torch.save(net, tmp_path / "whole.pt")
    (tmp_path / "notes.pt").write_text("epoch 3 looked best")
    torch.save([net.state_dict()], tmp_path / "list.pt")
    for name, match in (
        ("whole.pt", "cannot be read as a state dict"),
        ("notes.pt", "cannot be read as a state dict"),
        ("list.pt", "holds a list, not a state dict"),
    ):
        with pytest.raises(ValueError, match=rf"{name}.*{match}"):
            check_checkpoint(str(tmp_path / name), net)


def test_a_0_8_checkpoint_passes_the_check_and_loads(tmp_path):
    """0.8.0 saved one nn.Linear per tabular field (tabular_tokens.proj.<i>.*); the network upgrades that layout
    when it loads, so the check that inference and evaluation run first lets it through, and the weights agree."""
    from medfusionnet.data.tabular import NUM_TABULAR_FEATURES
    from medfusionnet.engine.checkpoints import check_checkpoint

    net = medfusionnet.create_network("medfusionnet", network_size="tiny", image_size=64).eval()
    state = net.state_dict()
    weight, bias = state.pop("tabular_tokens.weight"), state.pop("tabular_tokens.bias")
    for i, (start, end, _) in enumerate(net.tabular_tokens.fields):
        state[f"tabular_tokens.proj.{i}.weight"] = weight[i, : end - start].t().clone()
        state[f"tabular_tokens.proj.{i}.bias"] = bias[i].clone()
    torch.save(state, tmp_path / "v080.pt")
    fresh = medfusionnet.create_network("medfusionnet", network_size="tiny", image_size=64).eval()
    check_checkpoint(str(tmp_path / "v080.pt"), fresh)
    assert not torch.equal(fresh.tabular_tokens.weight, weight)  # the check loads into a copy, not the network
    fresh.load_state_dict(torch.load(tmp_path / "v080.pt", weights_only=True))
    image, tab = torch.rand(2, 1, 64, 64), torch.rand(2, NUM_TABULAR_FEATURES)
    torch.testing.assert_close(fresh(image, tab), net(image, tab))
    del state["tabular_tokens.proj.0.bias"]  # a broken old checkpoint is still refused by name
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"broken.pt.*absent from the checkpoint"):
        check_checkpoint(str(tmp_path / "broken.pt"), fresh)


def test_a_0_3_checkpoint_is_refused_by_name(tmp_path):
    """0.3.0's MedFusionNet base (384-wide transformer, pyramids, fusion logits only) is the 0.4.0 network with
    these switches; its weights do not load into the 0.4.0 default, and the refusal names the new parts."""
    from medfusionnet.engine.checkpoints import check_checkpoint

    old = medfusionnet.create_network("medfusionnet", baseline_path=False, fpn=True, embed_dim=384, num_heads=6)
    torch.save(old.state_dict(), tmp_path / "v030.pt")
    with pytest.raises(ValueError, match=r"v030.pt.*differ in shape.*absent from the checkpoint \(e.g\. .*'gate'"):
        check_checkpoint(str(tmp_path / "v030.pt"), medfusionnet.create_network("medfusionnet"))
