"""PACS round trip: Orthanc and MONAI Label on loopback, studies in, results back as DICOM, checked value by value.

    python scripts/pacs_roundtrip.py [--model_dir models] [--count 3] [--load_requests 200 --parallel 4]

1. Packages a bundle (without ``--model_dir``: an untrained tiny MedFusionNet, which exercises the path only) with a
   small NIH risk model, as `monailabel_roundtrip` does.
2. Starts Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``; HTTP on 127.0.0.1 only, no DICOM port) with an
   empty store, and uploads over STOW-RS the two DICOMs of ``../shared/data/dicom`` and ``--count`` NIH PNGs
   converted to CR / DX DICOM with their age, sex and view in the header (the first as MONOCHROME1).
3. Starts MONAI Label with ``--studies http://127.0.0.1:<port>/dicom-web`` and runs
   `slicer_module_client` (the 3D Slicer module's steps) on every X-ray series; checks that the segmentation
   model is listed, the label map has the X-ray's size, and its segments are named by positive finding.
4. Runs ``scripts/to_pacs.py`` on every study, then reads the stored SR and SEG back from Orthanc (WADO-RS): the
   SR's probability, threshold and decision of every finding and its tier must equal the decisions written
   locally and MONAI Label's answer for the same image; the SEG's segments must be the positive findings, and
   every labelled pixel of MONAI Label's map must lie in that finding's SEG segment. The MONOCHROME1 X-ray's
   probabilities must equal those of the same pixels stored as MONOCHROME2, run locally.
5. Malformed requests (unknown image id, a text upload, a DICOM without pixels, a bad parameter) must answer 4xx
   and the server keep serving; then a bounded load test (``--load_requests`` JSON requests, ``--parallel`` at a
   time) measures the error rate and latency. Last, with Orthanc stopped, a series never fetched must answer 502
   and one fetched before must still be answered from MONAI Label's cache.

Prints the figures as JSON and exits 1 on any failure; both servers are stopped in every case.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "..", "shared", "data")
ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def xray_dicom(png: str, row: dict, modality: str, monochrome1: bool = False):
    """A single-frame CR or DX DICOM of an NIH PNG, with its patient's age, sex and view (pydicom dataset)."""
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}[modality]
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # a file dataset with its preamble, so that a STOW-RS client writes the "DICM" prefix every reader expects
    ds = pydicom.dataset.FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.PatientID = str(row["Patient ID"])
    ds.PatientName = f"NIH^{row['Patient ID']}"
    ds.PatientBirthDate = ""
    ds.PatientSex = str(row["Patient Gender"])
    ds.PatientAge = f"{int(row['Patient Age']):03d}Y"
    ds.ViewPosition = str(row["View Position"])
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.SeriesDescription = f"NIH ChestX-ray14 {row['Image Index']}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelData = (255 - pixels if monochrome1 else pixels).tobytes()
    return ds


def start_orthanc(work: str, port: int) -> subprocess.Popen:
    """Orthanc with the DICOMweb plugin, HTTP on ``port`` reachable from this machine only, storage in ``work``."""
    config = {
        "Name": "MedFusionNetPACS",
        "StorageDirectory": os.path.join(work, "orthanc-db"),
        "IndexDirectory": os.path.join(work, "orthanc-db"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = os.path.join(work, "orthanc.json")
    with open(path, "w") as f:
        json.dump(config, f)
    with open(os.path.join(work, "orthanc.log"), "w") as log:  # the child keeps its own handle
        return subprocess.Popen([ORTHANC, path], stdout=log, stderr=subprocess.STDOUT)


def request(method: str, url: str, fields: dict | None = None, upload: tuple[str, bytes] | None = None):
    """``(status, body, seconds)`` of a multipart/form-data request (MONAI Label's ``params`` and ``file``)."""
    boundary = "medfusionnet-roundtrip"
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if upload:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{upload[0]}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + upload[1] + b"\r\n")
    data = b"".join(parts) + f"--{boundary}--\r\n".encode() if parts else None
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"} if data else {}
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=data, method=method, headers=headers), timeout=300
        ) as r:
            return r.status, r.read(), time.perf_counter() - start
    except urllib.error.HTTPError as err:
        return err.code, err.read(), time.perf_counter() - start


def malformed_requests(base: str, series: str, work: str) -> list[dict]:
    """The answers to requests MONAI Label must refuse with a 4xx, then one it must still answer."""
    import pydicom

    no_pixels = os.path.join(work, "no_pixels.dcm")
    source = sorted(os.listdir(os.path.join(DATA, "dicom")))[0]
    ds = pydicom.dcmread(os.path.join(DATA, "dicom", source))
    del ds.PixelData
    ds.save_as(no_pixels)
    with open(no_pixels, "rb") as f:
        no_pixel_bytes = f.read()
    cases = [
        ("unknown image id", f"{base}/infer/medfusionnet?image=1.2.3.4.5&output=json", {}, None, 404),
        ("text upload", f"{base}/infer/medfusionnet?output=json", {}, ("notes.txt", b"not an x-ray"), 422),
        ("DICOM without pixels", f"{base}/infer/medfusionnet?output=json", {}, ("no_pixels.dcm", no_pixel_bytes), 422),
        (
            "bad cam_threshold",
            f"{base}/infer/medfusionnet_findings?image={series}&output=json",
            {"params": json.dumps({"cam_threshold": "high"})},
            None,
            422,
        ),
        ("well-formed after them", f"{base}/infer/medfusionnet?image={series}&output=json", {}, None, 200),
    ]
    answers = []
    for name, url, fields, upload, expected in cases:
        status, body, _ = request("POST", url, fields, upload)
        detail = body.decode(errors="replace")[:200]
        answers.append({"case": name, "status": status, "expected": expected, "detail": detail})
    return answers


def load_test(base: str, images: list[str], total: int, parallel: int) -> dict:
    """``total`` JSON inferences over ``images``, ``parallel`` at a time: error rate and latency percentiles."""
    urls = [f"{base}/infer/medfusionnet?image={images[i % len(images)]}&output=json" for i in range(total)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        answers = list(pool.map(lambda url: request("POST", url), urls))
    wall = time.perf_counter() - start
    seconds = np.array([a[2] for a in answers])
    errors = sum(1 for a in answers if a[0] != 200)
    return {
        "requests": total,
        "parallel": parallel,
        "errors": errors,
        "error_rate": errors / total,
        "p50_s": round(float(np.percentile(seconds, 50)), 3),
        "p95_s": round(float(np.percentile(seconds, 95)), 3),
        "max_s": round(float(seconds.max()), 3),
        "throughput_per_s": round(total / wall, 2),
    }


def check_sr(report: dict, decided: dict, served: dict, model: dict, source_uid: str) -> list[str]:
    """The SR read back against the local decisions and MONAI Label's answer for the same image."""
    problems = []
    if report.get("model") != model["name"] or report.get("version") != model["version"]:
        problems.append(f"model {report.get('model')} {report.get('version')} != {model['name']} {model['version']}")
    if report.get("source", {}).get("sop_instance") != source_uid:
        problems.append(f"SR references {report.get('source')} instead of {source_uid}")
    if report.get("tier") != decided["tier"] or report.get("tier") != served["tier"]:
        problems.append(f"tier {report.get('tier')} vs decided {decided['tier']} vs served {served['tier']}")
    if set(report["findings"]) != set(decided["probabilities"]):
        problems.append(f"SR findings {sorted(report['findings'])}")
    for label, values in report["findings"].items():
        expected = (decided["probabilities"][label], decided["thresholds"][label], decided["decisions"][label])
        got = (values.get("probability"), values.get("threshold"), values.get("decision"))
        if (
            got[0] is None
            or abs(got[0] - expected[0]) > 1e-6
            or abs(got[1] - expected[1]) > 1e-6
            or got[2] != expected[2]
        ):
            problems.append(f"{label}: SR {got} vs decided {expected}")
        if abs(served["probabilities"][label] - expected[0]) > 1e-4 or served["decisions"][label] != expected[2]:
            problems.append(f"{label}: MONAI Label {served['probabilities'][label]} vs to_pacs {expected[0]}")
    return problems


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", help="a training run's output_dir (default: an untrained tiny network)")
    parser.add_argument("--count", type=int, default=3, help="NIH PNGs converted and uploaded")
    parser.add_argument("--load_requests", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--orthanc_port", type=int, default=8042)
    parser.add_argument("--port", type=int, default=8766, help="MONAI Label's port")
    parser.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "medfusionnet-monailabel"))
    parser.add_argument("--python", help="an interpreter with monailabel installed (skips --venv)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    sys.path.insert(0, os.path.join(REPO, "bundle"))
    import pandas as pd
    import pydicom
    from dicomweb_client.api import DICOMwebClient
    from monailabel_roundtrip import ensure_venv, nih_risk_model, start_monailabel, stop, tiny_run, venv_env, wait_for
    from package_bundle import NAME, package

    from medfusionnet.report.dicom import read_report, segment_labels
    from medfusionnet.serving import XrayPredictor

    for path in (ORTHANC, DICOMWEB_PLUGIN):
        if not os.path.exists(path):
            print(f"{path} not found: install the Debian packages orthanc and orthanc-dicomweb", file=sys.stderr)
            return 1
    work = tempfile.mkdtemp(prefix="pacs-roundtrip-")
    python = args.python or ensure_venv(args.venv)
    model_dir = args.model_dir or tiny_run(os.path.join(work, "run"))
    risk_model = os.path.join(work, "risk_model.json")
    nih_risk_model(os.path.join(DATA, "nih", "labels.csv"), risk_model)
    package(model_dir, os.path.join(work, "dist"), risk_model=risk_model)
    bundle = os.path.join(work, "dist", NAME)
    models = os.path.join(bundle, "models")
    predictor = XrayPredictor(models)
    model = predictor.describe()

    failures: list[str] = []
    figures: dict = {"work_dir": work}
    dicomweb = f"http://127.0.0.1:{args.orthanc_port}/dicom-web"
    orthanc = start_orthanc(work, args.orthanc_port)
    server = None
    try:
        if wait_for(f"http://127.0.0.1:{args.orthanc_port}/system", orthanc, 60) is None:
            raise RuntimeError(f"Orthanc did not start (log: {work}/orthanc.log)")
        client = DICOMwebClient(url=dicomweb)
        # the studies: the shared DICOMs as they are, NIH PNGs as CR / DX with their header fields
        labels = pd.read_csv(os.path.join(DATA, "nih", "labels.csv")).set_index("Image Index")
        pngs = sorted(set(labels.index) & set(os.listdir(os.path.join(DATA, "nih", "images_full"))))[: args.count]
        uploads = [
            pydicom.dcmread(os.path.join(DATA, "dicom", f)) for f in sorted(os.listdir(os.path.join(DATA, "dicom")))
        ]
        converted = {}
        for i, name in enumerate(pngs):
            row = {"Image Index": name, **labels.loc[name].to_dict()}
            ds = xray_dicom(os.path.join(DATA, "nih", "images_full", name), row, "CR" if i % 2 == 0 else "DX", i == 0)
            converted[ds.SeriesInstanceUID] = (name, row, ds.PhotometricInterpretation)
            uploads.append(ds)
        for ds in uploads:
            client.store_instances([ds])
        series = {ds.SeriesInstanceUID: ds for ds in uploads}
        figures["uploaded"] = {
            "dicom": len(uploads) - len(pngs),
            "nih_png_as_dicom": len(pngs),
            "monochrome1": sum(1 for ds in uploads if ds.PhotometricInterpretation == "MONOCHROME1"),
        }

        start = time.perf_counter()
        server, base, log = start_monailabel(python, bundle, dicomweb, work, args.port, {"modalities": "CR,DX"})
        info = wait_for(f"{base}/info/", server, 300)
        figures["monailabel_start_s"] = round(time.perf_counter() - start, 1)
        if info is None:
            raise RuntimeError(f"MONAI Label did not start (log: {log})")

        # what a Slicer user gets: the module's steps on every X-ray series
        start = time.perf_counter()
        status, body, first = request(
            "POST", f"{base}/infer/medfusionnet?image={uploads[0].SeriesInstanceUID}&output=json"
        )
        figures["first_infer_s"] = round(first, 3)
        slicer = subprocess.run(
            [python, os.path.join(REPO, "scripts", "slicer_module_client.py"), "--server", base, "--images", *series],
            capture_output=True,
            text=True,
            env=venv_env(python),
        )
        if slicer.returncode != 0:
            raise RuntimeError(f"Slicer-style client failed: {slicer.stdout[-500:]} {slicer.stderr[-2000:]}")
        seen = json.loads(slicer.stdout.strip().splitlines()[-1])
        figures["slicer"] = {"segmentation_models": seen["segmentation_models"], "samples": []}
        served = {}
        for sample in seen["samples"]:
            ds = series[sample["id"]]
            params = sample["params"]
            served[sample["id"]] = params
            expected_size = [int(ds.Columns), int(ds.Rows)]
            positive = set(params["findings"])
            if sample["size"][:2] != expected_size:
                failures.append(f"{sample['id']}: label map {sample['size']} vs X-ray {expected_size}")
            if not set(sample["segments"]) <= positive:
                failures.append(f"{sample['id']}: segments {sorted(sample['segments'])} not all positive {positive}")
            if sorted(sample["segments"]) != sorted(params["segments"]):
                failures.append(f"{sample['id']}: Slicer's names {sorted(sample['segments'])} vs {params['segments']}")
            if positive and not sample["segments"] and any(params["probabilities"][f] for f in positive):
                failures.append(f"{sample['id']}: positive findings {sorted(positive)} but no segment")
            for key in ("probabilities", "thresholds", "decisions", "tier", "tabular_risk", "combined_tier"):
                if key not in params:
                    failures.append(f"{sample['id']}: params lack {key}")
            if not os.path.isfile(params.get("report", "")):
                failures.append(f"{sample['id']}: no decisions.html at {params.get('report')}")
            figures["slicer"]["samples"].append(
                {
                    "id": sample["id"],
                    "segments": sample["segments"],
                    "tier": params["tier"],
                    "spacing": sample["spacing"],
                }
            )
        if seen["segmentation_models"] != ["medfusionnet_findings"]:
            failures.append(f"segmentation selector lists {seen['segmentation_models']}")

        # DICOMweb inference without MONAI Label, results stored back and read back
        stored_checks = []
        for series_uid, ds in series.items():
            out = os.path.join(work, "to_pacs", ds.StudyInstanceUID)
            run = subprocess.run(
                [
                    sys.executable,
                    os.path.join(REPO, "scripts", "to_pacs.py"),
                    "--model_dir",
                    models,
                    "--dicomweb",
                    dicomweb,
                    "--study",
                    ds.StudyInstanceUID,
                    "--output_dir",
                    out,
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": os.path.join(REPO, "bundle")},
            )
            if run.returncode != 0:
                failures.append(f"to_pacs {ds.StudyInstanceUID}: {run.stderr[-1000:]}")
                continue
            with open(os.path.join(out, "decisions.json")) as f:
                document = json.load(f)
            decided = {**document["images"][0], "thresholds": document["thresholds"]}
            study_series = client.search_for_series(search_filters={"StudyInstanceUID": ds.StudyInstanceUID})
            by_modality = {}
            for item in study_series:
                by_modality.setdefault(item["00080060"]["Value"][0], []).append(item["0020000E"]["Value"][0])
            if len(by_modality.get("SR", [])) != 1:
                failures.append(f"study {ds.StudyInstanceUID}: {len(by_modality.get('SR', []))} SR series stored")
                continue
            sr = client.retrieve_series(ds.StudyInstanceUID, by_modality["SR"][0])[0]
            problems = check_sr(read_report(sr), decided, served[series_uid], model, str(ds.SOPInstanceUID))
            failures += [f"{series_uid} SR: {p}" for p in problems]
            check = {
                "series": series_uid,
                "sr_findings": len(read_report(sr)["findings"]),
                "sr_problems": len(problems),
            }
            if decided["findings"]:
                if len(by_modality.get("SEG", [])) != 1:
                    failures.append(f"study {ds.StudyInstanceUID}: no SEG stored for {decided['findings']}")
                else:
                    seg = client.retrieve_series(ds.StudyInstanceUID, by_modality["SEG"][0])[0]
                    names = segment_labels(seg)
                    if names != decided["findings"]:
                        failures.append(f"{series_uid} SEG segments {names} vs positive {decided['findings']}")
                    check["seg_segments"] = names
                    label_file = next(s["label_file"] for s in seen["samples"] if s["id"] == series_uid)
                    failures += seg_covers_label_map(seg, label_file, names, series_uid)
            stored_checks.append(check)
            if series_uid in converted and converted[series_uid][2] == "MONOCHROME1":
                # the same pixels as MONOCHROME2 (DICOM intensities are min-max scaled, PNGs divided by 255)
                name, row, _ = converted[series_uid]
                plain = os.path.join(work, "monochrome2.dcm")
                xray_dicom(os.path.join(DATA, "nih", "images_full", name), row, ds.Modality).save_as(plain)
                local = predictor.predict(plain)
                gap = max(
                    abs(local.result["probabilities"][k] - decided["probabilities"][k])
                    for k in local.result["probabilities"]
                )
                figures["monochrome1_vs_monochrome2_max_gap"] = gap
                if gap > 1e-5:
                    failures.append(f"MONOCHROME1 {name}: probabilities differ from MONOCHROME2 by up to {gap}")
        figures["stored"] = stored_checks

        figures["malformed"] = malformed_requests(base, uploads[0].SeriesInstanceUID, work)
        for answer in figures["malformed"]:
            if answer["status"] != answer["expected"]:
                failures.append(
                    f"{answer['case']}: HTTP {answer['status']}, expected {answer['expected']}: {answer['detail']}"
                )
        steady = [request("POST", f"{base}/infer/medfusionnet?image={s}&output=json")[2] for s in list(series)[:3]]
        figures["steady_infer_s"] = [round(s, 3) for s in steady]
        if args.load_requests:
            figures["load"] = load_test(base, list(series), args.load_requests, args.parallel)
            if figures["load"]["errors"]:
                failures.append(f"load test: {figures['load']['errors']} failed request(s)")
        # the PACS goes down: a series never fetched gets a 502, one already fetched is still answered
        stop(orthanc)
        orthanc = None
        figures["pacs_down"] = {}
        for case, image, expected in (
            ("not fetched", "1.2.3.4.6", 502),
            ("fetched before", uploads[0].SeriesInstanceUID, 200),
        ):
            status, body, _ = request("POST", f"{base}/infer/medfusionnet?image={image}&output=json")
            figures["pacs_down"][case] = status
            if status != expected:
                failures.append(f"PACS down, {case}: HTTP {status}, expected {expected}: {body[:200]!r}")
    except Exception as err:  # any failure is reported with the figures so far, and the servers still stop
        failures.append(f"{type(err).__name__}: {err}")
    finally:
        for process in (server, orthanc):
            stop(process)
    figures["failures"] = failures
    print(json.dumps(figures, indent=2, default=str))
    return 1 if failures else 0


def seg_covers_label_map(seg, label_file: str, names: list[str], series_uid: str) -> list[str]:
    """Every pixel of MONAI Label's label map that names a finding lies inside that finding's SEG segment."""
    import nibabel as nib

    sys.path.insert(0, os.path.join(REPO, "bundle"))
    from medfusionnet.constants import LABELS

    label_map = np.asarray(nib.load(label_file).dataobj).T  # written as (x, y); back to (row, column)
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    numbers = [
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for f in seg.PerFrameFunctionalGroupsSequence
    ]
    problems = []
    for value in sorted(set(np.unique(label_map).tolist()) - {0}):
        finding = LABELS[value - 1]
        if finding not in names:
            problems.append(f"{series_uid}: label map holds {finding}, which has no SEG segment")
            continue
        segment = frames[numbers.index(names.index(finding) + 1)] > 0
        region = label_map == value
        outside = int((region & ~segment).sum())
        # the two servers run different torch builds: a map value at the threshold may round either way
        if outside > 0.01 * int(region.sum()):
            problems.append(
                f"{series_uid}: {outside} of {int(region.sum())} pixel(s) of {finding} lie outside its SEG segment"
            )
    return problems


if __name__ == "__main__":
    sys.exit(main())
