"""Check an NIH-format dataset before training: split sizes, findings per split, missing and unreadable files.

    python scripts/check_dataset.py --dataset_dir /data/nih [--labels_csv a.csv:b.csv] [--images_dir a:b] [--decode]

Prints a table of positives per finding in each split and writes it as JSON with ``--output``. ``--decode`` reads
every image once (slow on the full dataset) and lists the files that cannot be decoded. Exit status 1 when any
listed image is missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

from medfusionnet.constants import LABELS
from medfusionnet.data.image_reader import read_xray
from medfusionnet.data.nih import as_paths, frame_to_records, read_nih_csvs, split_frame
from medfusionnet.data.unreadable import UnreadableImageError


def summarize_dataset(dataset_dir, labels_csv=None, images_dir=None, split="official", seed=0, decode=False) -> dict:
    """Counts per split and finding, plus the names of missing and (with ``decode``) unreadable images."""
    csvs = as_paths(labels_csv) or [os.path.join(dataset_dir, "Data_Entry_2017.csv")]
    folders = as_paths(images_dir) or [os.path.join(dataset_dir, "images")]
    frame = read_nih_csvs(csvs)
    parts = split_frame(frame, split, (dataset_dir, *(os.path.dirname(p) for p in csvs)), seed=seed)
    summary = {"labels_csv": csvs, "images_dir": folders, "splits": {}, "missing": [], "unreadable": []}
    for name, part in parts.items():
        records, missing = frame_to_records(part, folders)
        summary["missing"] += missing
        if decode:
            for record in records:
                try:
                    read_xray(record["image"])
                except UnreadableImageError as e:
                    summary["unreadable"].append(f"{record['name']}: {e.reason}")
        positives = np.sum([r["label"] for r in records], axis=0) if records else np.zeros(len(LABELS))
        summary["splits"][name] = {
            "images": len(records),
            "patients": len({r["patient_id"] for r in records}),
            "no_finding": int(sum(r["label"].sum() == 0 for r in records)),
            "positives": dict(zip(LABELS, np.asarray(positives, int).tolist())),
        }
    return summary


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--labels_csv", help="one CSV, or several joined by the path separator (':' on Linux)")
    parser.add_argument("--images_dir", help="one folder, or several joined by the path separator")
    parser.add_argument("--split", default="official", choices=("official", "random"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode", action="store_true", help="decode every image to find unreadable files")
    parser.add_argument("--output", help="write the summary as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = summarize_dataset(args.dataset_dir, args.labels_csv, args.images_dir, args.split, args.seed, args.decode)
    splits = summary["splits"]
    print(f"{'finding':<20}" + "".join(f"{s:>10}" for s in splits))
    for key in ("images", "patients", "no_finding"):
        print(f"{key:<20}" + "".join(f"{splits[s][key]:>10}" for s in splits))
    for label in LABELS:
        print(f"{label:<20}" + "".join(f"{splits[s]['positives'][label]:>10}" for s in splits))
    print(
        f"missing files: {len(summary['missing'])}; unreadable files: {len(summary['unreadable'])}"
        + ("" if args.decode else " (not checked; use --decode)")
    )
    for line in summary["unreadable"][:20]:
        print(f"  unreadable: {line}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {os.path.abspath(args.output)}")
    return 1 if summary["missing"] or summary["unreadable"] else 0


if __name__ == "__main__":
    sys.exit(main())
