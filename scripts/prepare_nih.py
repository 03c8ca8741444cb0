"""Prepare NIH ChestX-ray14 for training: resized PNGs, the metadata CSV and the official split lists.

    python scripts/prepare_nih.py --source /downloads/nih --data_entry Data_Entry_2017_v2020.csv \\
        --train_val_list train_val_list.txt --test_list test_list.txt --output_dir /data/nih256 --size 256

``--source`` is NIH's download: a folder searched recursively for PNGs (the extracted ``images_001/images/...``), or
a folder of the 12 ``images_*.tar.gz`` archives, read without extracting them. Every image is resized on its longest
side to ``--size`` (Lanczos, 8-bit grayscale) and written to ``<output_dir>/images/<Image Index>``, through a temporary
file and a rename, by ``--workers`` processes with a progress bar. A rerun skips images already written (resumable)
and the run ends by verifying the counts against the CSV. ``<output_dir>`` then holds ``Data_Entry_2017.csv`` and
the split lists, ready for ``--dataset_dir <output_dir>``; ``--cache disk`` in train.yaml keeps the decoded tensors.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed

import pandas as pd
from PIL import Image
from tqdm import tqdm

from medfusionnet.files import outputs_line


def resized_png(data: bytes | str, size: int) -> Image.Image:
    """An 8-bit grayscale image resized on its longest side to ``size`` (never enlarged)."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        image = image.convert("L")
        scale = size / max(image.size)
        if scale < 1:
            image = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
            )
        return image.copy()


def write_atomic(image: Image.Image, path: str) -> None:
    """Save as PNG through ``<path>.tmp`` and a rename, so an interrupted run never leaves a partial file.

    Raises:
        OSError: naming ``path`` (with the original ``errno``) when the write fails, e.g. on a full disk; the
            temporary file is removed and an earlier file at ``path`` is left as it was.
    """
    tmp = f"{path}.tmp"
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(err.errno, err.strerror or str(err), path) from err


def _convert_file(src: str, dst: str, size: int) -> tuple[str, str | None]:
    try:
        write_atomic(resized_png(src, size), dst)
        return os.path.basename(dst), None
    except Exception as err:  # one bad file is reported, the rest go on
        return os.path.basename(dst), f"{type(err).__name__}: {err}"


def _convert_archive(archive: str, out_dir: str, size: int, wanted: set) -> list[tuple[str, str | None]]:
    results = []
    with tarfile.open(archive) as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if not member.isfile() or name not in wanted or os.path.isfile(os.path.join(out_dir, name)):
                continue
            try:
                write_atomic(resized_png(tar.extractfile(member).read(), size), os.path.join(out_dir, name))
                results.append((name, None))
            except Exception as err:
                results.append((name, f"{archive}: {type(err).__name__}: {err}"))
    return results


def prepare(
    source: str,
    data_entry: str,
    output_dir: str,
    size: int = 256,
    workers: int = 2,
    train_val_list: str | None = None,
    test_list: str | None = None,
) -> dict:
    """Convert the images listed in ``data_entry`` found under ``source``; returns the summary (also written to
    ``<output_dir>/prepare_summary.json``).

    Raises:
        ValueError: naming the CSV when it has no ``Image Index`` column.
        FileNotFoundError: naming ``source`` when it is not a folder.
    """
    if not os.path.isdir(source):
        raise FileNotFoundError(f"source '{source}' is not a folder")
    table = pd.read_csv(data_entry, dtype=str, keep_default_na=False)
    if "Image Index" not in table.columns:
        raise ValueError(f"{data_entry}: no 'Image Index' column; expected NIH's Data_Entry CSV")
    wanted = set(table["Image Index"].str.strip())
    out_dir = os.path.join(output_dir, "images")
    os.makedirs(out_dir, exist_ok=True)
    for stale in (f for f in os.listdir(out_dir) if f.endswith(".tmp")):  # left by an interrupted run
        os.remove(os.path.join(out_dir, stale))
    table.to_csv(os.path.join(output_dir, "Data_Entry_2017.csv"), index=False)
    for given, name in ((train_val_list, "train_val_list.txt"), (test_list, "test_list.txt")):
        if given:
            shutil.copyfile(given, os.path.join(output_dir, name))
    done_before = {f for f in os.listdir(out_dir) if f in wanted}
    files, archives = {}, []
    for root, _, names in os.walk(source):
        for name in names:
            if name in wanted and name not in done_before:
                files[name] = os.path.join(root, name)
            elif name.endswith((".tar.gz", ".tgz", ".tar")):
                archives.append(os.path.join(root, name))
    errors = {}
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = [pool.submit(_convert_file, src, os.path.join(out_dir, name), size) for name, src in files.items()]
        jobs += [pool.submit(_convert_archive, a, out_dir, size, wanted - done_before - set(files)) for a in archives]
        with tqdm(total=len(jobs), desc="prepare_nih", unit="job") as bar:
            for job in as_completed(jobs):
                result = job.result()
                for name, error in result if isinstance(result, list) else [result]:
                    if error:
                        errors[name] = error
                bar.update(1)
    present = {f for f in os.listdir(out_dir) if f in wanted}
    summary = {
        "listed": len(wanted),
        "present": len(present),
        "skipped_existing": len(done_before),
        "converted": len(present) - len(done_before),
        "missing": len(wanted - present),
        "errors": errors,
        "size": size,
    }
    with open(os.path.join(output_dir, "prepare_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status (1 when an image could not be converted)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="folder of PNGs (any depth) or of the images_*.tar.gz")
    parser.add_argument("--data_entry", required=True, help="Data_Entry_2017*.csv (or .csv.gz)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--train_val_list")
    parser.add_argument("--test_list")
    args = parser.parse_args(argv)
    summary = prepare(
        args.source, args.data_entry, args.output_dir, args.size, args.workers, args.train_val_list, args.test_list
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "errors"}, indent=2))
    for name, error in sorted(summary["errors"].items()):
        print(f"could not convert {name}: {error}")
    if summary["missing"]:
        print(f"{summary['missing']} image(s) listed in {args.data_entry} were not found under {args.source}")
    print(outputs_line(args.output_dir))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
