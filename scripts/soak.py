"""Soak run: repeated short train / evaluate / infer cycles, in one process, on synthetic data with bad files mixed in.

    python scripts/soak.py --cycles 10 --output_dir /tmp/soak [--bad_files 6] [--seed 0]

Each cycle builds a fresh synthetic dataset, overwrites some of its listed images with bad files (empty, truncated,
not an image) and drops more bad files (also a 3-D NIfTI and a DICOM without pixels) beside them, then trains a
tiny network for one epoch, evaluates it on the test split and runs inference over the whole image folder. It
checks that every good file is processed and every bad one reported (skip counts in training, validation and
evaluation, where training may leave out the bad files that fall into its dropped last batch; the unreadable list
of inference), and records the process's resident memory after each cycle. Prints
one line per cycle and a summary; writes ``soak.json``. Exit status 1 when a check fails or memory keeps growing
(more than ``--max_growth_mib`` from the second cycle to the last).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import shutil
import sys
from pathlib import Path

import numpy as np

from medfusionnet.files import outputs_line

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
BAD_KINDS_LISTED = ("empty", "truncated", "text")  # keep the .png name the CSV lists
BAD_KINDS_EXTRA = ("empty", "truncated", "text", "volume", "dicom_without_pixels")
logger = logging.getLogger("soak")


def rss_mib() -> float:
    """Resident memory of this process in MiB (Linux ``/proc``); NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def write_bad_file(path: Path, kind: str, good_png: bytes) -> Path:
    """Write a bad input of ``kind`` at ``path`` (its suffix set by the kind where needed); returns the path."""
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good_png[: len(good_png) // 2])
    elif kind == "text":
        path.write_bytes(b"patient id,finding\n1,none\n" * 20)
    elif kind == "volume":
        import nibabel as nib

        path = path.with_suffix(".nii.gz")
        nib.save(nib.Nifti1Image(np.random.rand(16, 16, 8).astype(np.float32), np.eye(4)), str(path))
    elif kind == "dicom_without_pixels":
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        path = path.with_suffix(".dcm")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientAge, ds.PatientSex = "DX", "054Y", "F"
        ds.save_as(str(path), enforce_file_format=True)
    else:
        raise ValueError(f"unknown bad file kind '{kind}'")
    return path


def make_cycle_data(root: Path, seed: int, num_bad: int) -> tuple[Path, set[str], set[str]]:
    """A synthetic dataset with bad files: returns its folder, the bad names the CSV lists and the extra bad names."""
    from medfusionnet.data.demo import make_demo_dataset

    data = Path(make_demo_dataset(str(root), num_patients=60, image_size=64, seed=seed))
    images = data / "images"
    rng = random.Random(seed)
    listed = sorted(p for p in images.iterdir() if p.suffix == ".png")
    good_png = listed[0].read_bytes()
    bad_listed = set()
    for path in rng.sample(listed[1:], num_bad):
        write_bad_file(path, rng.choice(BAD_KINDS_LISTED), good_png)
        bad_listed.add(path.name)
    bad_extra = set()
    for i in range(num_bad):
        kind = BAD_KINDS_EXTRA[i % len(BAD_KINDS_EXTRA)]
        bad_extra.add(write_bad_file(images / f"zz_bad_{i}.png", kind, good_png).name)
    return data, bad_listed, bad_extra


def run_workflow(config_files: list[str], **overrides):
    """Run a bundle workflow in this process; returns its parsed config (engines and datasets inside)."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE_ROOT / c) for c in config_files],
        meta_file=str(BUNDLE_ROOT / "configs/metadata.json"),
        logging_file=str(BUNDLE_ROOT / "configs/logging.conf"),
        workflow_type=None,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow.parser


def cycle(index: int, output_dir: Path, num_bad: int, seed: int) -> dict:
    """One train / evaluate / infer cycle; returns its checks and figures."""
    root = output_dir / f"cycle{index}"
    shutil.rmtree(root, ignore_errors=True)
    data, bad_listed, bad_extra = make_cycle_data(root / "data", seed + index, num_bad)
    run = root / "run"
    shared = dict(
        dataset_dir=str(data),
        output_dir=str(run),
        network_size="tiny",
        image_size=64,
        num_workers=0,
        seed=seed + index,
        sampling="natural",
        batch_size=8,
    )
    parser = run_workflow(["configs/train.yaml"], max_epochs=1, **shared)
    datasets = parser.get_parsed_content("datasets")
    split_bad = {
        split: sum(r["name"] in bad_listed for r in getattr(datasets, split)) for split in ("train", "val", "test")
    }
    trainer, evaluator = parser.get_parsed_content("trainer"), parser.get_parsed_content("evaluator")
    # training drops the epoch's last, incomplete batch, so bad files drawn into it go unseen
    remainder = len(datasets.train) % shared["batch_size"]
    skipped = trainer.state.skipped_images
    checks = {
        "train skips": (
            skipped,
            skipped if split_bad["train"] - remainder <= skipped <= split_bad["train"] else split_bad["train"],
        ),
        "validation skips": (evaluator.state.skipped_images, split_bad["val"]),
    }
    del parser, trainer, evaluator, datasets
    parser = run_workflow(["configs/train.yaml", "configs/evaluate.yaml"], **shared)
    report = json.loads((run / "eval" / "metrics.json").read_text())
    test_size = len(parser.get_parsed_content("datasets").test)
    checks["evaluated images"] = (report["num_images"], test_size - split_bad["test"])
    del parser
    images = data / "images"
    parser = run_workflow(["configs/inference.yaml"], output_dir=str(run), input_dir=str(images), num_workers=0)
    decisions = json.loads((Path(parser.get_parsed_content("infer_dir")) / "decisions.json").read_text())
    items = decisions["images"] if isinstance(decisions, dict) else decisions
    unreadable = {Path(i["image"]).name for i in items if i["status"] == "unreadable"}
    processed = {Path(i["image"]).name for i in items if i["status"] != "unreadable"}
    all_files = {p.name for p in images.iterdir() if p.is_file()}
    checks["inference: bad files reported"] = (sorted(unreadable), sorted(bad_listed | bad_extra))
    checks["inference: good files processed"] = (sorted(processed), sorted(all_files - bad_listed - bad_extra))
    del parser
    shutil.rmtree(root, ignore_errors=True)
    gc.collect()
    failed = [name for name, (got, want) in checks.items() if got != want]
    return {
        "cycle": index,
        "rss_mib": rss_mib(),
        "bad_listed": len(bad_listed),
        "bad_extra": len(bad_extra),
        "split_bad": split_bad,
        "failed": failed,
        "checks": {
            k: {"got": g if isinstance(g, int) else len(g), "want": w if isinstance(w, int) else len(w)}
            for k, (g, w) in checks.items()
        },
    }


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--bad_files", type=int, default=6, help="bad files per cycle, both listed and extra")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_growth_mib",
        type=float,
        default=50.0,
        help="largest resident-memory growth from the second cycle to the last that passes",
    )
    args = parser.parse_args(argv)
    if args.cycles < 3:
        parser.error("--cycles must be 3 or more (memory growth is measured from the second cycle)")
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = []
    for i in range(args.cycles):
        results.append(cycle(i, output_dir, args.bad_files, args.seed))
        r = results[-1]
        print(
            f"cycle {i}: RSS {r['rss_mib']:.0f} MiB, {r['bad_listed']} listed + {r['bad_extra']} extra bad files, "
            f"checks {'failed: ' + ', '.join(r['failed']) if r['failed'] else 'passed'}",
            flush=True,
        )
    growth = results[-1]["rss_mib"] - results[1]["rss_mib"]
    failed = [r["cycle"] for r in results if r["failed"]]
    summary = {
        "cycles": results,
        "rss_growth_mib": growth,
        "failed_cycles": failed,
        "max_growth_mib": args.max_growth_mib,
    }
    (output_dir / "soak.json").write_text(json.dumps(summary, indent=2))
    print(
        f"{args.cycles} cycles, {sum(r['bad_listed'] + r['bad_extra'] for r in results)} bad files; failed cycles: "
        f"{failed or 'none'}; resident memory {results[1]['rss_mib']:.0f} -> {results[-1]['rss_mib']:.0f} MiB "
        f"(growth {growth:+.0f} MiB from cycle 1)"
    )
    print(outputs_line(output_dir))
    return 1 if failed or growth > args.max_growth_mib else 0


if __name__ == "__main__":
    sys.exit(main())
