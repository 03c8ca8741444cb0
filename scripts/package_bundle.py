"""Package a trained run as a MONAI Model Zoo bundle: a standard-layout folder and its zip.

    python scripts/package_bundle.py --model_dir models --output_dir dist [--weights_url https://...] \
        [--risk_model runs/risk/model.json]

Layout of ``<output_dir>/<name>`` (zipped to ``<output_dir>/<name>.zip``)::

    configs/   metadata.json (a real file), inference.yaml, train.yaml, evaluate.yaml, explain.yaml,
               multi_gpu_train.yaml, logging.conf
    models/    model.pt and the run files inference reads (run_settings, tabular_encoder, thresholds, calibration);
               with --risk_model, risk_model.json (the two-stage risk model of scripts/build_risk_model.py)
    docs/      README.md (the bundle card), architecture.md, reliability.md, data_license.txt, images/
    medfusionnet/  the bundle's code, importable because MONAI's commands run from the bundle root
    demo_data/ a few synthetic X-rays (not real images), inference.yaml's default input
    LICENSE, and with --weights_url large_files.yml (model.pt's download address and SHA-256); without it model.pt
    stays in models/ (a warning when it exceeds the zoo's 25 MB limit)

Inside the unpacked folder: ``python -m monai.bundle run --config_file configs/inference.yaml --input_dir <xrays>``.
The Python packages inference needs are ``monai`` and metadata.json's ``required_packages_version``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys

import yaml

from medfusionnet.data.demo import make_demo_dataset
from medfusionnet.risk.assessment import PatientRiskAssessor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_PATIENTS = 4  # synthetic demo patients shipped in demo_data/
logger = logging.getLogger("package_bundle")
ZOO_FILE_LIMIT_MB = 25  # the largest file the Model Zoo's repository holds; larger ones go in large_files.yml
# Zoo bundles are named <anatomy/modality>_<task>
NAME = "cxr14_medfusionnet_classification"
CONFIGS = (
    "train.yaml",
    "evaluate.yaml",
    "inference.yaml",
    "explain.yaml",
    "multi_gpu_train.yaml",
    "logging.conf",
)
RUN_FILES = (
    "model.pt",
    "run_settings.json",
    "tabular_encoder.json",
    "thresholds.json",
    "calibration.json",
    "label_counts.json",
    "metrics.json",
    "risk_model.json",  # a run trained with --risk_model: its copy for inference's tabular risk report
)
REQUIRED_RUN_FILES = ("model.pt", "run_settings.json", "tabular_encoder.json")
RISK_MODEL_FILE = "risk_model.json"  # in models/, beside the network


def sha256(path: str) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package(model_dir: str, output_dir: str, name: str = NAME, weights_url: str = "", risk_model: str = "") -> str:
    """Write the bundle folder and zip; returns the zip's path. ``risk_model``: a two-stage risk model JSON
    (`medfusionnet.risk.two_stage.save_models`) to ship as ``models/risk_model.json``.

    Raises:
        FileNotFoundError: naming the run files that ``model_dir`` lacks, or a ``risk_model`` that does not exist.
        ValueError: naming ``risk_model`` when it is not a saved two-stage risk model.
    """
    missing = [f for f in REQUIRED_RUN_FILES if not os.path.isfile(os.path.join(model_dir, f))]
    if missing:
        raise FileNotFoundError(f"{model_dir}: missing {missing}; package the output_dir of a training run")
    if risk_model:
        if not os.path.isfile(risk_model):
            raise FileNotFoundError(f"--risk_model {risk_model} does not exist; give build_risk_model.py's model.json")
        PatientRiskAssessor.load(risk_model)  # loads as inference will, checked before anything is written
        if os.path.isfile(os.path.join(model_dir, RISK_MODEL_FILE)):
            logger.warning(
                "%s was trained with a risk model of its own, which stays embedded in its tabular encoding; the "
                "decisions will report the risk of --risk_model %s instead",
                model_dir,
                risk_model,
            )
    root = os.path.join(output_dir, name)
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(os.path.join(root, "configs"))
    for config in CONFIGS:
        shutil.copy2(os.path.join(REPO, "configs", config), os.path.join(root, "configs", config))
    shutil.copyfile(os.path.join(REPO, "metadata.json"), os.path.join(root, "configs", "metadata.json"))
    os.makedirs(os.path.join(root, "models"))
    for run_file in RUN_FILES:
        if os.path.isfile(os.path.join(model_dir, run_file)):
            shutil.copy2(os.path.join(model_dir, run_file), os.path.join(root, "models", run_file))
    if risk_model:
        shutil.copyfile(risk_model, os.path.join(root, "models", RISK_MODEL_FILE))
    shutil.copytree(os.path.join(REPO, "docs"), os.path.join(root, "docs"))
    shutil.copytree(
        os.path.join(REPO, "bundle", "medfusionnet"),
        os.path.join(root, "medfusionnet"),
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    shutil.copy2(os.path.join(REPO, "LICENSE"), os.path.join(root, "LICENSE"))
    # inference.yaml's default input_dir: a few synthetic images, so the bundle runs (and the zoo's property check
    # builds its dataset) before a user points it at real X-rays
    make_demo_dataset(os.path.join(root, "demo_data"), num_patients=SAMPLE_PATIENTS)
    weights = os.path.join(root, "models", "model.pt")
    size_mb = os.path.getsize(weights) / 2**20
    if weights_url:
        entry = {"path": "models/model.pt", "url": weights_url, "hash_val": sha256(weights), "hash_type": "sha256"}
        with open(os.path.join(root, "large_files.yml"), "w") as f:
            yaml.safe_dump({"large_files": [entry]}, f, sort_keys=False)
    elif size_mb > ZOO_FILE_LIMIT_MB:
        logger.warning(
            "models/model.pt is %.0f MB: the Model Zoo keeps files over %d MB out of its repository; upload it and "
            "package again with --weights_url <its address> (written to large_files.yml with its SHA-256)",
            size_mb,
            ZOO_FILE_LIMIT_MB,
        )
    return shutil.make_archive(root, "zip", root_dir=output_dir, base_dir=name)


def requirements() -> list[str]:
    """``monai==<version>`` and metadata.json's required packages, as pip requirement strings."""
    with open(os.path.join(REPO, "metadata.json")) as f:
        metadata = json.load(f)
    packages = {
        "monai": metadata["monai_version"],
        "torch": metadata["pytorch_version"],
        **metadata.get("required_packages_version", {}),
    }
    return [f"{p}=={v}" for p, v in packages.items()]


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="a training run's output_dir")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--name", default=NAME)
    parser.add_argument("--weights_url", default="", help="where model.pt can be downloaded (for large_files.yml)")
    parser.add_argument("--risk_model", default="", help="build_risk_model.py's model.json, shipped in models/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    archive = package(args.model_dir, args.output_dir, args.name, args.weights_url, args.risk_model)
    print(f"wrote {os.path.join(args.output_dir, args.name)} and {archive}")
    print("requirements: " + " ".join(requirements()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
