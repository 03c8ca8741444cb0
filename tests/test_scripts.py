import importlib.util
import json

from conftest import REPO


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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


def test_benchmark_reports_ratios_to_the_reference(tmp_path, capsys):
    bench = _script("benchmark")
    out = tmp_path / "bench.json"
    assert bench.main(["--networks", "medfusionnet:tiny", "densenet121", "--image_size", "64", "--batch_size", "2",
                       "--rounds", "1", "--device", "cpu", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    ref, tiny = report["results"]["densenet121"], report["results"]["medfusionnet:tiny"]
    assert ref["train_ratio"] == 1.0 and ref["gmacs_ratio"] == 1.0
    assert tiny["gmacs_ratio"] == tiny["gmacs"] / ref["gmacs"] and tiny["params_m"] < ref["params_m"]
    assert abs(ref["params_m"] - 6.96) < 0.01  # DenseNet-121 with a 1-channel stem and the tabular head
    assert "medfusionnet:tiny" in capsys.readouterr().out


def test_imbalance_study_summary_by_hand():
    study = _script("imbalance_study")

    def report(auc, recall_a, recall_b):
        return {"mean": {"auc": auc, "f1": 0.5, "gmean": 0.6},
                "per_class": {"A": {"sensitivity": recall_a}, "B": {"sensitivity": recall_b}}}

    summary = study.summarize({"toolkit": [report(0.7, 1.0, 0.5), report(0.8, 0.0, None)]}, ["A", "B"])
    figures = summary["toolkit"]
    assert abs(figures["mean AUC"]["mean"] - 0.75) < 1e-9 and abs(figures["mean AUC"]["std"] - 0.05) < 1e-9
    assert figures["rare recall"]["runs"] == [0.75, 0.0]  # an undefined recall (no positive) is left out
    assert abs(figures["recall B"]["mean"] - 0.5) < 1e-9
    assert set(study.SETTINGS) == {"baseline", "toolkit"}
