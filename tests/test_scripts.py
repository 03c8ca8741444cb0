import importlib.util
import json
import logging
import os
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, require, write_tiny_run

from medfusionnet.risk import two_stage


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # importable by name, so worker processes can unpickle its functions
    spec.loader.exec_module(module)
    return module


def test_check_dataset_counts_and_missing_files(nih_dir, tmp_path, capsys):
    check = _script("check_dataset")
    out = tmp_path / "summary.json"
    args = ["--dataset_dir", str(nih_dir), "--labels_csv", str(nih_dir / "labels.csv"), "--output", str(out)]
    assert check.main(args + ["--images_dir", str(nih_dir / "images_256"), "--decode"]) == 0
    summary = json.loads(out.read_text())
    assert sum(s["images"] for s in summary["splits"].values()) == 469
    assert summary["splits"]["test"]["images"] == 56
    assert sum(s["positives"]["Infiltration"] for s in summary["splits"].values()) == 92
    assert "Hernia" in capsys.readouterr().out
    assert check.main(args + ["--images_dir", str(nih_dir / "images_full")]) == 1  # 319 images are not there
    assert len(json.loads(out.read_text())["missing"]) == 319


def test_benchmark_reports_ratios_memory_and_data_pipeline(tmp_path, capsys):
    images = require(REPO.parent / "shared" / "data" / "nih" / "images_full")
    bench = _script("benchmark")
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                "--networks",
                "medfusionnet:tiny",
                "densenet121",
                "--variants",
                "fp32",
                "checkpoint",
                "--image_size",
                "64",
                "--batch_size",
                "2",
                "--rounds",
                "1",
                "--device",
                "cpu",
                "--matmul_size",
                "256",
                "--data_dir",
                str(images),
                "--data_limit",
                "4",
                "--data_workers",
                "0",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    rows = {(r["network"], r["variant"]): r for r in report["results"]}
    assert set(rows) == {("medfusionnet:tiny", "fp32"), ("medfusionnet:tiny", "checkpoint"), ("densenet121", "fp32")}
    ref, tiny = rows["densenet121", "fp32"], rows["medfusionnet:tiny", "fp32"]
    assert ref["train_ratio_to_reference"] == 1.0 and ref["gmacs_ratio_to_reference"] == 1.0
    assert tiny["gmacs_ratio_to_reference"] == tiny["gmacs"] / ref["gmacs"] and tiny["params_m"] < ref["params_m"]
    assert abs(ref["params_m"] - 6.96) < 0.01  # DenseNet-121 with a 1-channel stem and the tabular head
    assert "train_ratio_to_reference" not in rows["medfusionnet:tiny", "checkpoint"]  # no DenseNet row to compare
    for row in rows.values():
        assert row["peak_memory_mib"] > 0 and 0 < row["matmul_fraction"]
        # achieved FLOP/s is three forward passes per trained image
        assert row["train_tflop_s"] == pytest.approx(6 * row["gmacs"] * 1e9 * row["train_img_s"] / 1e12)
    assert report["matmul_peak_tflop_s"]["float32"] > 0
    data = report["data_pipeline"]
    assert data["images"] == 4 and min(data["decode_img_s"], data["cache_read_img_s"]) > 0
    printed = capsys.readouterr().out
    assert "checkpoint" in printed
    latency = ref["infer_img_s"] / tiny["infer_img_s"]
    assert (
        f"medfusionnet:tiny (fp32) against densenet121: training {tiny['train_ratio_to_reference']:.2f}x its "
        f"images/s, inference latency {latency:.2f}x, GMACs {tiny['gmacs_ratio_to_reference']:.2f}x"
    ) in printed


def test_benchmark_refuses_an_unknown_variant():
    with pytest.raises(ValueError, match="fp8"):
        _script("benchmark").main(["--variants", "fp32", "fp8"])


def test_imbalance_study_summary_by_hand():
    study = _script("imbalance_study")

    def report(auc, recall_a, recall_b):
        return {
            "mean": {"auc": auc, "f1": 0.5, "gmean": 0.6},
            "per_class": {"A": {"sensitivity": recall_a}, "B": {"sensitivity": recall_b}},
        }

    summary = study.summarize({"toolkit": [report(0.7, 1.0, 0.5), report(0.8, 0.0, None)]}, ["A", "B"])
    figures = summary["toolkit"]
    assert abs(figures["mean AUC"]["mean"] - 0.75) < 1e-9 and abs(figures["mean AUC"]["std"] - 0.05) < 1e-9
    assert figures["rare recall"]["runs"] == [0.75, 0.0]  # an undefined recall (no positive) is left out
    assert abs(figures["recall B"]["mean"] - 0.5) < 1e-9
    assert set(study.SETTINGS) == {"baseline", "toolkit"}


def test_package_bundle_layout(tmp_path, monkeypatch, caplog):
    import zipfile

    import yaml

    package = _script("package_bundle")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="model.pt"):
        package.package(str(run), str(tmp_path / "dist"))
    write_tiny_run(run)
    archive = package.package(str(run), str(tmp_path / "dist"))
    root = tmp_path / "dist" / package.NAME
    assert not (root / "configs" / "metadata.json").is_symlink()
    assert (root / "configs" / "metadata.json").read_text() == (REPO / "metadata.json").read_text()
    for path in (
        "configs/inference.yaml",
        "models/model.pt",
        "models/run_settings.json",
        "docs/README.md",
        "docs/data_license.txt",
        "LICENSE",
        "medfusionnet/networks/medfusionnet.py",
        "demo_data/images/00000001_000.png",
    ):
        assert (root / path).is_file(), path
    assert not (root / "large_files.yml").exists()  # without a download address the weights stay in models/
    monkeypatch.setattr(package, "ZOO_FILE_LIMIT_MB", 0)
    with caplog.at_level(logging.WARNING):
        package.package(str(run), str(tmp_path / "dist"), weights_url="https://example.org/model.pt")
    assert "--weights_url" not in caplog.text  # a download address was given: no warning
    entry = yaml.safe_load((root / "large_files.yml").read_text())["large_files"][0]
    assert entry["path"] == "models/model.pt" and entry["hash_val"] == package.sha256(str(run / "model.pt"))
    assert entry["url"] == "https://example.org/model.pt"
    package.package(str(run), str(tmp_path / "dist"))
    assert "Model Zoo keeps files over 0 MB" in caplog.text and "--weights_url" in caplog.text
    names = zipfile.ZipFile(archive).namelist()
    assert f"{package.NAME}/configs/metadata.json" in names and not any("__pycache__" in n for n in names)
    assert any(r.startswith("monai==") for r in package.requirements())
    assert not (root / "models" / package.RISK_MODEL_FILE).exists()
    with pytest.raises(ValueError, match="run_settings.json: not a two-stage risk model JSON"):
        package.package(str(run), str(tmp_path / "dist2"), risk_model=str(run / "run_settings.json"))
    assert not (tmp_path / "dist2").exists()  # refused before anything was written
    rng = np.random.default_rng(0)
    x = pd.DataFrame({"age": rng.uniform(20, 80, 200), "smokes": rng.integers(0, 2, 200).astype(float)})
    y = pd.Series((x["age"] > 50).astype(int) | (rng.random(200) < 0.1).astype(int))
    risk = two_stage.TwoStageRiskModel(stage2="tree").fit(x, y)
    two_stage.save_models(tmp_path / "risk.json", {"Biopsy": risk})
    package.package(str(run), str(tmp_path / "dist"), risk_model=str(tmp_path / "risk.json"))
    document = json.loads((tmp_path / "risk.json").read_text())
    del document["tabular_fields"]  # a 0.8.0 risk model: inference could not parse a patient for it
    (tmp_path / "old_risk.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="old_risk.json: the risk model declares no 'tabular_fields'"):
        package.package(str(run), str(tmp_path / "dist3"), risk_model=str(tmp_path / "old_risk.json"))
    shipped = two_stage.load_models(root / "models" / package.RISK_MODEL_FILE)["Biopsy"]
    np.testing.assert_allclose(shipped.predict_proba(x), risk.predict_proba(x))


@pytest.mark.slow
def test_packaged_bundle_runs_inference_in_a_fresh_environment(tmp_path, dicom_files):
    import subprocess
    import sys
    import zipfile

    package = _script("package_bundle")
    run = tmp_path / "run"
    run.mkdir()
    archive = package.package(str(write_tiny_run(run)), str(tmp_path / "dist"))
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(archive).extractall(unpacked)
    root = unpacked / package.NAME
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # no access to this repository
    python = str(venv / "bin" / "python")
    proc = subprocess.run(
        [python, "-m", "pip", "install", "-q", *package.requirements()], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [python, "-c", "import medfusionnet; print(medfusionnet.__file__)"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(root))  # the bundle's own copy of the code
    proc = subprocess.run(
        [
            python,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.yaml",
            "--input_dir",
            str(dicom_files[0].parent),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    decisions = json.loads((root / "models" / "inference" / "decisions.json").read_text())
    assert len(decisions["images"]) == 2 and all(i["status"] == "ok" for i in decisions["images"])


def test_prepare_nih_from_a_folder_and_an_archive(nih_dir, tmp_path, capsys):
    import tarfile

    import numpy as np
    from PIL import Image

    prepare = _script("prepare_nih")
    names = sorted(os.listdir(nih_dir / "images_full"))[:4]
    source = tmp_path / "download"
    (source / "images_001" / "images").mkdir(parents=True)
    for name in names[:2]:
        (source / "images_001" / "images" / name).symlink_to(nih_dir / "images_full" / name)
    with tarfile.open(source / "images_002.tar.gz", "w:gz") as tar:
        for name in names[2:]:
            tar.add(nih_dir / "images_full" / name, arcname=f"images/{name}")
    broken = "00000099_000.png"  # listed in the CSV below, unreadable on disk
    (source / broken).write_bytes(b"not a png")
    table = pd.read_csv(nih_dir / "labels.csv")
    table = pd.concat([table[table["Image Index"].isin(names)], table.iloc[:1].assign(**{"Image Index": broken})])
    table.to_csv(tmp_path / "entry.csv", index=False)
    out = tmp_path / "nih256"
    argv = [
        "--source",
        str(source),
        "--data_entry",
        str(tmp_path / "entry.csv"),
        "--output_dir",
        str(out),
        "--size",
        "256",
        "--workers",
        "2",
        "--test_list",
        str(nih_dir / "meta" / "test_list.txt"),
    ]
    assert prepare.main(argv) == 1  # the broken file is reported
    last = capsys.readouterr().out.strip().splitlines()[-1]  # where the outputs are, last
    assert last == f"outputs in {out}: Data_Entry_2017.csv, images/, prepare_summary.json, test_list.txt"
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["present"] == 4 and summary["converted"] == 4 and list(summary["errors"]) == [broken]
    assert (out / "test_list.txt").is_file() and (out / "Data_Entry_2017.csv").is_file()
    for name in names:
        ours = np.asarray(Image.open(out / "images" / name))
        reference = np.asarray(Image.open(nih_dir / "images_256" / name).convert("L"))
        assert ours.shape == (256, 256) and np.abs(ours.astype(int) - reference).max() <= 1
    (out / "images" / "leftover.png.tmp").write_bytes(b"partial")
    (source / broken).unlink()
    assert prepare.main(argv) == 0  # resumed: nothing redone, the stale temporary file removed
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["skipped_existing"] == 4 and summary["converted"] == 0 and summary["missing"] == 1
    assert not (out / "images" / "leftover.png.tmp").exists()


def _network_args(overrides):
    """train.yaml's ``network_args`` with compare.py's bundle overrides, tiny sizes and 96 px."""
    import ast

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.yaml"))
    settings = {"network_size": "tiny", "image_size": 96, "label_counts": None}
    for flag, value in zip(overrides[::2], overrides[1::2]):
        try:
            settings[flag[2:]] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[flag[2:]] = value
    parser.update(settings)
    if settings.get("network_name") == "ctranscnn":
        parser["network_args#network_size"] = "tiny"
    parser.parse()
    return parser.get_parsed_content("network_args")


def test_every_compared_model_builds_and_gives_logits():
    import importlib.util

    import torch

    import medfusionnet
    from medfusionnet.networks.registry import TIMM_NETWORKS

    compare = _script("compare")
    has_timm = importlib.util.find_spec("timm") is not None
    for model, overrides in compare.MODELS.items():
        kwargs = _network_args(overrides)
        if kwargs["name"] in TIMM_NETWORKS and not has_timm:
            continue  # the optional extra; tests/test_timm_baselines.py covers these where it is installed
        net = medfusionnet.create_network(**kwargs).eval()
        with torch.no_grad():
            for tabular in (None, torch.zeros(2, medfusionnet.NUM_TABULAR_FEATURES)):
                assert net(torch.rand(2, 1, 96, 96), tabular).shape == (2, 14), model
        # and a training step changes the weights
        net.train()
        before = [p.detach().clone() for p in net.parameters()]
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(torch.rand(2, 1, 96, 96)), torch.ones(2, 14))
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, net.parameters())), model


def test_compare_refuses_bad_arguments(tmp_path):
    compare = _script("compare")
    for argv in (["--models", "resnet9"], ["--models", "cnn_only", "cnn_only"], ["--seed", "3"]):
        with pytest.raises(SystemExit):
            compare.main([*argv, "--output_dir", str(tmp_path)])


@pytest.mark.slow
def test_compare_ranks_models_and_resumes(tmp_path, monkeypatch, capsys):
    compare = _script("compare")
    out = tmp_path / "compare"
    shared = ["--network_size", "tiny", "--max_epochs", "1", "--num_workers", "0", "--demo_dir", str(tmp_path / "d")]
    assert (
        compare.main(["--models", "medfusionnet", "cnn_only", "--seeds", "0", "--output_dir", str(out), *shared]) == 0
    )
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"outputs in {out}: ")
    stats = json.loads((out / "stats.json").read_text())
    assert "friedman" not in stats and len(stats["wilcoxon_holm"]) == 1  # two models: pairwise test only
    assert [d["model"] for d in stats["paired_mean_auc"]] == ["cnn_only"] and stats["best_vs_last"]["runs"] == 2
    # one epoch: the last epoch is the best one, so its separately evaluated weights score the same
    assert stats["best_vs_last"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert "Wilcoxon signed-rank" in (out / "summary.md").read_text()
    first = (out / "runs" / "medfusionnet" / "seed0" / "run_info.json").stat().st_mtime_ns
    # a third model and an ensemble of the first two: the finished runs are reused, not retrained
    monkeypatch.setitem(compare.ENSEMBLES, "ensemble", ("medfusionnet", "cnn_only"))
    models = ["medfusionnet", "cnn_only", "no_tabular", "ensemble"]
    assert compare.main(["--models", *models, "--seeds", "0", "--output_dir", str(out), *shared]) == 0
    assert (out / "runs" / "medfusionnet" / "seed0" / "run_info.json").stat().st_mtime_ns == first
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["model"]) == sorted(models)
    assert results["auc_last"].isna().tolist() == [m == "ensemble" for m in results["model"]]
    params = dict(zip(results["model"], results["params_m"]))
    assert params["cnn_only"] < params["no_tabular"] < params["medfusionnet"]  # the ablations drop parts
    assert params["ensemble"] == pytest.approx(params["medfusionnet"] + params["cnn_only"])
    seconds = dict(zip(results["model"], results["train_seconds"]))
    assert seconds["ensemble"] == pytest.approx(seconds["medfusionnet"] + seconds["cnn_only"])
    # the ensemble's test probabilities are the mean of its members'
    preds = {
        m: pd.read_csv(out / "runs" / m / "seed0" / "eval" / "predictions.csv").set_index("Image Index")
        for m in ("medfusionnet", "cnn_only", "ensemble")
    }
    np.testing.assert_allclose(preds["ensemble"], (preds["medfusionnet"] + preds["cnn_only"]) / 2, atol=2e-5)
    assert (out / "runs" / "ensemble" / "seed0" / "thresholds.json").is_file()  # chosen on validation
    stats = json.loads((out / "stats.json").read_text())
    ranks = stats["friedman"]["mean_ranks"]
    assert sum(ranks.values()) == pytest.approx(10.0)  # 1 + 2 + 3 + 4 in every block
    assert 2 <= stats["friedman"]["blocks"] <= 14 and 0 <= stats["friedman"]["p_value"] <= 1
    assert stats["nemenyi"]["critical_difference"] > 0 and len(stats["nemenyi"]["pairs"]) == 6
    summary = (out / "summary.md").read_text()
    assert all(m in summary for m in ("medfusionnet", "cnn_only", "no_tabular")) and "Friedman" in summary
    assert (out / "ranks.png").stat().st_size > 0 and (out / "per_class_auc.png").stat().st_size > 0


def test_soak_bad_files_are_unreadable_and_cycles_are_checked(tmp_path):
    from PIL import Image

    from medfusionnet.data.image_reader import read_xray
    from medfusionnet.data.unreadable import UnreadableImageError

    soak = _script("soak")
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "good.png")
    good = (tmp_path / "good.png").read_bytes()
    for kind in soak.BAD_KINDS_EXTRA:
        path = soak.write_bad_file(tmp_path / f"{kind}.png", kind, good)
        with pytest.raises(UnreadableImageError, match=path.name):
            read_xray(str(path))
    with pytest.raises(SystemExit):
        soak.main(["--cycles", "2", "--output_dir", str(tmp_path / "soak")])


def test_learning_curve_reads_each_budget_and_plots(tmp_path, capsys):
    curve = _script("learning_curve")
    for epochs, shift in ((5, 0.0), (10, 0.1)):
        folder = tmp_path / f"e{epochs}"
        folder.mkdir()
        pd.DataFrame(
            {
                "model": ["medfusionnet", "densenet121"] * 2,
                "seed": [0, 0, 1, 1],
                "auc": [0.5 + shift, 0.6 + shift, 0.7 + shift, 0.6 + shift],
                "auc_last": [0.55, 0.65, 0.65, 0.55],
                "f1": 0.1,
            }
        ).to_csv(folder / "results.csv", index=False)
    assert (
        curve.main(
            ["--runs", f"10={tmp_path / 'e10'}", f"5={tmp_path / 'e5'}", "--output", str(tmp_path / "out" / "curve")]
        )
        == 0
    )
    table = pd.read_csv(tmp_path / "out" / "curve.csv")
    assert list(table.columns) == ["epochs", "model", "seed", "auc", "auc_last"]
    assert table["epochs"].tolist() == [5] * 4 + [10] * 4  # sorted by budget whatever the order given
    means = table.groupby(["epochs", "model"])["auc"].mean()
    assert means[(5, "medfusionnet")] == pytest.approx(0.6) and means[(10, "densenet121")] == pytest.approx(0.7)
    assert (tmp_path / "out" / "curve.png").stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(ValueError, match="'e5' is not EPOCHS=FOLDER"):
        curve.parse_runs(["e5"])
    with pytest.raises(FileNotFoundError, match="20 epochs: .*results.csv does not exist"):
        curve.read_curve({20: tmp_path / "none"})


def test_the_model_zoo_ci_passes_on_the_package_from_the_zoo_root(tmp_path):
    """The zoo's own scripts (ci/verify_bundle.py -m full: layout, metadata schema, inference properties, data
    shape, TorchScript export) and its format checks, run from the zoo's root as its CI runs them."""
    import shutil
    import subprocess

    zoo_ci = require(REPO.parent / "shared" / "tools" / "model-zoo-ci")
    package = _script("package_bundle")
    run = write_tiny_run(tmp_path / "run")
    package.package(str(run), str(tmp_path / "dist"))
    zoo = tmp_path / "zoo"
    shutil.copytree(zoo_ci, zoo)
    bundle = zoo / "models" / package.NAME
    shutil.copytree(tmp_path / "dist" / package.NAME, bundle)
    (bundle / "eval").mkdir()
    shutil.copy(zoo / "models" / "meta_schema_20240725.json", bundle / "eval" / "schema.json")  # nothing downloaded
    commands = [
        ["ci/verify_bundle.py", "-b", package.NAME, "-p", "models", "-m", "full"],
        ["-m", "black", "--check", f"models/{package.NAME}"],
        ["-m", "isort", "--check-only", f"models/{package.NAME}"],
        ["-m", "flake8", f"models/{package.NAME}"],
    ]
    for command in commands:
        proc = subprocess.run([sys.executable, *command], cwd=zoo, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    assert (bundle / "models" / "verify_model.ts").is_file()
    json_files = [p for p in bundle.rglob("*.json") if p.parent.name != "eval"]
    for path in json_files:  # the zoo's pre-commit layout
        text = path.read_text()
        assert text.endswith("\n") and not text.endswith("\n\n") and '\n    "' in text, path
