"""MONAI Label round trip: package a bundle, serve it with ``monailabel_app``, and call ``/infer`` as a client would.

    python scripts/monailabel_roundtrip.py [--model_dir models] [--images ../shared/data/nih/images_full]

MONAI Label pulls the CUDA build of torch and torchvision, so it gets its own virtual environment (``--venv``, made
and filled on first use, about 8 GB; ``--python`` uses an existing interpreter that has ``monailabel`` instead).
Without ``--model_dir`` an untrained tiny MedFusionNet is packaged, which exercises the serving path only; a small
two-stage risk model of NIH metadata (``--labels_csv``) is packaged with it, and each request carries the image's
age / sex / view / follow-up as MONAI Label params, so the answer holds the tabular risk and the combined tier. The
studies folder holds links to the first ``--count`` images, so MONAI Label's datastore files never land next to the
data. Prints the figures as JSON (server start time, round trip per request) and exits with 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# monailabel 0.8.5 imports pydicom_seg, which needs pydicom < 3, and then dicomweb-client / pynetdicom of that era
PACKAGES = ("monailabel==0.8.5", "pydicom<3", "dicomweb-client[gcp]<0.60", "pynetdicom<3")


def ensure_venv(venv: str) -> str:
    """Python of ``venv``, created and filled with `PACKAGES` when it has no ``monailabel`` yet."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.isfile(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    if subprocess.run([python, "-c", "import monailabel"], capture_output=True).returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", *PACKAGES], check=True)
    return python


def tiny_run(out: str) -> str:
    """A training run folder holding an untrained tiny MedFusionNet at 64 px."""
    sys.path.insert(0, os.path.join(REPO, "bundle"))
    import torch

    from medfusionnet import TabularEncoder, create_network
    from medfusionnet.engine.run_settings import save_run_settings

    args = {"name": "medfusionnet", "network_size": "tiny", "image_size": 64}
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    torch.save(create_network(**args).state_dict(), os.path.join(out, "model.pt"))
    save_run_settings(out, image_size=64, network_args=args)
    TabularEncoder().fit(
        [
            {"age": "40", "sex": "M", "view": "PA", "follow_up": "0"},
            {"age": "60", "sex": "F", "view": "AP", "follow_up": "2"},
        ]
    ).save(os.path.join(out, "tabular_encoder.json"))
    return out


def nih_risk_model(labels_csv: str, path: str, outcomes=("Effusion", "Infiltration")) -> dict:
    """Fit a small two-stage risk model of ``outcomes`` on NIH metadata, save it to ``path``; returns the images'
    tabular fields ``{name: {"age", "sex", "view", "follow_up"}}`` as a PACS header would give them."""
    sys.path.insert(0, os.path.join(REPO, "bundle"))
    from medfusionnet.data.nih import read_nih_csv
    from medfusionnet.data.tabular import NIH_FIELDS
    from medfusionnet.risk import two_stage

    frame = read_nih_csv(labels_csv)
    x, y_table = two_stage.nih_tables(frame)
    params = {**two_stage.FOREST_PARAMS, "n_estimators": 20}
    models = {o: two_stage.TwoStageRiskModel(**params).fit(x, y_table[o]) for o in outcomes}
    two_stage.save_models(path, models, tabular_fields=NIH_FIELDS)
    columns = ["age", "sex", "view", "follow_up"]
    return {r["name"]: {c: str(r[c]) for c in columns} for r in frame[["name", *columns]].to_dict("records")}


def post(url: str, timeout: float = 300, params: dict | None = None) -> tuple[bytes, str, float]:
    """``(body, content type, seconds)`` of a POST, with MONAI Label's ``params`` form field when given."""
    start = time.perf_counter()
    data = urllib.parse.urlencode({"params": json.dumps(params)}).encode() if params else None
    request = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
        return body, response.headers.get("content-type", ""), time.perf_counter() - start


def start_monailabel(python: str, bundle: str, studies: str, work: str, port: int, conf: dict | None = None):
    """A MONAI Label server on 127.0.0.1:``port`` serving a copy of monailabel_app with ``bundle``; returns the
    process, the base URL and the server's log file."""
    app = os.path.join(work, "app")  # MONAI Label writes logs, caches and reports into the app folder: use a copy
    shutil.copytree(os.path.join(REPO, "monailabel_app"), app)
    command = [python, "-m", "monailabel.main", "start_server", "--app", app, "--studies", studies]
    for key, value in {"bundle_path": bundle, **(conf or {})}.items():
        command += ["--conf", key, value]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log_path = os.path.join(work, "monailabel.log")
    with open(log_path, "w") as log:  # the child keeps its own handle
        server = subprocess.Popen(command, env=venv_env(python), stdout=log, stderr=subprocess.STDOUT)
    return server, f"http://127.0.0.1:{port}", log_path


def venv_env(python: str) -> dict:
    """This process's environment for a program of ``python``'s virtual environment (its bin first, no PYTHONPATH,
    so the environment's own packages are the ones imported)."""
    env = {**os.environ, "PATH": os.path.dirname(python) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("PYTHONPATH", None)
    return env


def wait_for(url: str, process: subprocess.Popen, seconds: float) -> dict | None:
    """The JSON at ``url`` once it answers, or None when ``process`` ends or ``seconds`` pass."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.5)
    return None


def stop(process: subprocess.Popen | None) -> None:
    """Terminates ``process`` (killing it after 60 s)."""
    if process is None:
        return
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", help="a training run's output_dir (default: an untrained tiny network)")
    parser.add_argument("--images", default=os.path.join(REPO, "..", "shared", "data", "nih", "images_full"))
    parser.add_argument("--labels_csv", default=os.path.join(REPO, "..", "shared", "data", "nih", "labels.csv"))
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "medfusionnet-monailabel"))
    parser.add_argument("--python", help="an interpreter with monailabel installed (skips --venv)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    from PIL import Image

    work = tempfile.mkdtemp(prefix="monailabel-roundtrip-")
    python = args.python or ensure_venv(args.venv)
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import package_bundle

    model_dir = args.model_dir or tiny_run(os.path.join(work, "run"))
    bundle = os.path.join(work, "dist", package_bundle.NAME)
    risk_model = os.path.join(work, "risk_model.json")
    fields = nih_risk_model(args.labels_csv, risk_model)
    package_bundle.package(model_dir, os.path.join(work, "dist"), risk_model=risk_model)
    studies = os.path.join(work, "studies")
    os.makedirs(studies)
    names = sorted(f for f in os.listdir(args.images) if f.endswith(".png"))[: args.count]
    for name in names:
        os.symlink(os.path.abspath(os.path.join(args.images, name)), os.path.join(studies, name))
    start = time.perf_counter()
    server, base, log = start_monailabel(python, bundle, studies, work, args.port)
    failures, rounds, risks = [], [], []
    try:
        info = wait_for(f"{base}/info/", server, 300)
        started = time.perf_counter() - start
        if info is None or "medfusionnet" not in info.get("models", {}):
            failures.append(f"server did not come up with the medfusionnet model (log: {log})")
        for name in names if not failures else []:
            image_id = os.path.splitext(name)[0]
            body, _, seconds = post(f"{base}/infer/medfusionnet?image={image_id}&output=json", params=fields[name])
            result = json.loads(body)
            rounds.append(seconds)
            if result.get("tier") not in ("low", "medium", "high") or len(result.get("probabilities", {})) != 14:
                failures.append(f"{name}: unexpected JSON {str(result)[:200]}")
            tabular = result.get("tabular_risk", {})
            if tabular.get("status") != "ok" or set(tabular.get("outcomes", {})) != {"Effusion", "Infiltration"}:
                failures.append(f"{name}: no tabular risk for the fields {fields[name]}: {str(tabular)[:200]}")
            elif result.get("combined_tier") not in ("low", "medium", "high") or "combined_rule" not in result:
                failures.append(f"{name}: no combined tier in {str(result)[:200]}")
            else:
                risks.append({"image": name, "level": tabular["level"], "combined_tier": result["combined_tier"]})
            body, kind, seconds = post(f"{base}/infer/medfusionnet?image={image_id}&output=image")
            label = os.path.join(work, f"{image_id}_label.png")
            with open(label, "wb") as f:
                f.write(body)
            with Image.open(label) as label_image, Image.open(os.path.join(args.images, name)) as original:
                if "png" not in kind or label_image.size != original.size:
                    failures.append(f"{name}: label image {kind} {label_image.size} vs X-ray {original.size}")
    finally:
        stop(server)
    summary = {
        "images": len(names),
        "server_start_s": round(started, 1),
        "failures": failures,
        "json_round_trip_s": [round(r, 3) for r in rounds],
        "tabular_risk": risks,
        "work_dir": work,
    }
    print(json.dumps(summary, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
