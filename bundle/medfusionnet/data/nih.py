"""NIH ChestX-ray14 metadata: reading the CSV, patient-wise splits and datalists for MONAI datasets.

The reader accepts NIH's own files (``Data_Entry_2017.csv``, ``Data_Entry_2017_v2020.csv`` and Kaggle's
``sample_labels.csv``): a row per image with ``Image Index``, ``Finding Labels`` (``|``-separated, ``No Finding``
for none), ``Follow-up #``, ``Patient ID``, ``Patient Age`` (years, or DICOM-style ``058Y``), ``Patient Gender`` and
``View Position``. Splits never put one patient on two sides.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..constants import (
    COL_AGE,
    COL_FINDINGS,
    COL_FOLLOW_UP,
    COL_IMAGE,
    COL_PATIENT,
    COL_SEX,
    COL_VIEW,
    KEY_AGE,
    KEY_CLINICAL,
    KEY_FOLLOW_UP,
    KEY_IMAGE,
    KEY_LABEL,
    KEY_NAME,
    KEY_PATIENT,
    KEY_SEX,
    KEY_VIEW,
    LABELS,
    NO_FINDING,
    RAW_TABULAR_KEYS,
    REQUIRED_COLUMNS,
    SEX_CATEGORIES,
    VIEW_CATEGORIES,
)
from ..files import write_json_atomic
from . import image_reader
from .tabular import TabularEncoder, parse_age, parse_sex, parse_view

logger = logging.getLogger(__name__)

DEFAULT_LABELS_CSV = "Data_Entry_2017.csv"  # the files of NIH's download, where dataset_dir alone is given
DEFAULT_IMAGES_DIR = "images"
OFFICIAL_TRAIN_LIST = "train_val_list.txt"
OFFICIAL_TEST_LIST = "test_list.txt"
SPLITS = ("official", "random")


def parse_findings(text, labels=LABELS, where: str = "") -> np.ndarray:
    """Multi-hot float32 vector for a ``|``-separated ``Finding Labels`` cell (``No Finding`` gives all zeros).

    Raises:
        ValueError: for an empty cell, an unknown finding name, or ``No Finding`` combined with a finding; the
            message includes ``where`` (file and row).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: empty '{COL_FINDINGS}'; use '{NO_FINDING}' for an image without findings")
    names = [t.strip() for t in text.split("|") if t.strip()]
    vector = np.zeros(len(labels), dtype=np.float32)
    if names == [NO_FINDING]:
        return vector
    for name in names:
        if name not in labels:
            raise ValueError(f"{where}: unknown finding '{name}' in '{text}'; known: {NO_FINDING}, {', '.join(labels)}")
        vector[labels.index(name)] = 1.0
    return vector


def read_nih_csv(path: str, labels=LABELS) -> pd.DataFrame:
    """Read an NIH metadata CSV into a frame with one row per image.

    Columns of the result: ``name`` (file name), ``patient_id`` (str), ``age`` (years, NaN when missing or
    implausible), ``sex``, ``view``, ``follow_up`` (raw values) and ``label`` (a multi-hot vector per row).

    Raises:
        ValueError: for a missing required column, a duplicate ``Image Index``, an empty or unknown finding; the
            message names the file and, for row errors, the CSV line.

    Ages that cannot be parsed or are implausible, and sexes or view positions other than M/F and PA/AP, are
    encoded as missing; a warning counts the rows and quotes the first one.
    """
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing required column(s) {missing}; found {list(frame.columns)}. "
            f"An NIH metadata CSV needs {list(REQUIRED_COLUMNS)}"
        )
    names = frame[COL_IMAGE].str.strip()
    duplicated = names[names.duplicated(keep=False)]
    if len(duplicated):
        first = duplicated.index[:3]
        where = ", ".join(f"line {i + 2} ('{names[i]}')" for i in first)
        raise ValueError(f"{path}: duplicate '{COL_IMAGE}' values, e.g. {where}; each image must appear once")
    empty_patient = names[frame[COL_PATIENT].str.strip() == ""]
    if len(empty_patient):
        i = empty_patient.index[0]
        raise ValueError(f"{path}: line {i + 2} ('{names[i]}'): empty '{COL_PATIENT}'; splits need a patient per image")
    label_vectors = [
        parse_findings(text, labels, where=f"{path}: line {i + 2} ('{names[i]}')")
        for i, text in enumerate(frame[COL_FINDINGS])
    ]
    ages = frame[COL_AGE].map(parse_age)
    warn_unusable_fields(path, frame)
    return pd.DataFrame(
        {
            KEY_NAME: names,
            KEY_PATIENT: frame[COL_PATIENT].str.strip(),
            KEY_AGE: ages,
            KEY_SEX: frame[COL_SEX].str.strip(),
            KEY_VIEW: frame[COL_VIEW].str.strip(),
            KEY_FOLLOW_UP: frame[COL_FOLLOW_UP].str.strip(),
            KEY_LABEL: label_vectors,
        }
    )


def warn_unusable_fields(path: str, table: pd.DataFrame) -> None:
    """Log, per column of ``table`` (an NIH-format CSV read as text), how many rows hold an age, sex or view
    position that the tabular encoding treats as missing although the cell is not empty, quoting the first one.

    Ages that cannot be parsed or lie outside 0-120 years, sexes other than M/F and views other than PA/AP are
    encoded as missing rather than refused, so one odd row does not stop a run; the warning keeps them visible.
    """
    rules = (
        (COL_AGE, lambda v: np.isnan(parse_age(v)), "an unparseable or implausible", ""),
        (COL_SEX, lambda v: parse_sex(v) is None, "an unknown", f"; known: {', '.join(SEX_CATEGORIES)}"),
        (COL_VIEW, lambda v: parse_view(v) is None, "an unknown", f"; known: {', '.join(VIEW_CATEGORIES)}"),
    )
    for column, unusable, kind, known in rules:
        if column not in table.columns:
            continue
        text = table[column].astype(str).str.strip()
        bad = (text != "") & text.map(unusable)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            logger.warning(
                "%s: %d row(s) have %s '%s' (e.g. line %d: '%s'%s); encoded as missing",
                path,
                int(bad.sum()),
                kind,
                column,
                i + 2,
                text.iloc[i],
                known,
            )


def as_paths(value) -> list[str]:
    """One or several paths: a list, or a string holding one path or several joined by ``os.pathsep``."""
    if value is None:
        return []
    items = value.split(os.pathsep) if isinstance(value, str) else list(value)
    return [str(p).strip() for p in items if str(p).strip()]


def read_nih_csvs(paths: list[str], labels=LABELS) -> pd.DataFrame:
    """`read_nih_csv` of each file, rows concatenated in order.

    An image listed in several files keeps its first row when the files agree on its patient and findings.

    Raises:
        ValueError: naming both files and the image when they disagree on its patient or findings.
    """
    frames = [read_nih_csv(p, labels) for p in paths]
    merged, source = frames[0], pd.Series(paths[0], index=frames[0].index)
    for path, frame in zip(paths[1:], frames[1:]):
        first = dict(zip(merged[KEY_NAME], zip(merged[KEY_PATIENT], merged[KEY_LABEL], source)))
        repeated = frame[KEY_NAME].isin(first)
        for row in frame[repeated].itertuples(index=False):
            row = row._asdict()
            patient, label, where = first[row[KEY_NAME]]
            if row[KEY_PATIENT] != patient or not np.array_equal(row[KEY_LABEL], label):
                raise ValueError(
                    f"'{row[KEY_NAME]}' is listed in {where} and in {path} with a different patient or findings"
                )
        if repeated.any():
            logger.info(
                "%d image(s) of %s are already listed in an earlier labels_csv; the first row is kept",
                int(repeated.sum()),
                path,
            )
        kept = frame[~repeated]
        merged = pd.concat([merged, kept], ignore_index=True)
        source = pd.concat([source, pd.Series(path, index=kept.index)], ignore_index=True)
    return merged


def read_split_list(path: str) -> set[str]:
    """Image names of an NIH split list (one per line; the official files have no final newline)."""
    with open(path) as f:
        return {line.strip() for line in f if line.strip()}


def find_official_lists(*folders: str | None) -> tuple[str, str] | None:
    """Paths of ``train_val_list.txt`` and ``test_list.txt`` in the first folder (or its ``meta/``) holding both."""
    for folder in folders:
        if not folder:
            continue
        for candidate in (folder, os.path.join(folder, "meta")):
            train, test = os.path.join(candidate, OFFICIAL_TRAIN_LIST), os.path.join(candidate, OFFICIAL_TEST_LIST)
            if os.path.isfile(train) and os.path.isfile(test):
                return train, test
    return None


def patient_split(patients, fractions: tuple[float, ...], seed: int) -> list[set[str]]:
    """Partition unique patient ids at random (fixed ``seed``) into groups of the given fractions (summing to 1)."""
    unique = np.array(sorted(set(patients)))
    order = np.random.default_rng(seed).permutation(len(unique))
    bounds = np.round(np.cumsum(fractions) * len(unique)).astype(int)
    bounds[-1] = len(unique)
    groups, start = [], 0
    for end in bounds:
        groups.append(set(unique[order[start:end]].tolist()))
        start = end
    return groups


def split_frame(
    frame: pd.DataFrame,
    split: str = "official",
    list_folders: tuple = (),
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Split rows patient-wise into ``train``, ``val`` and ``test`` frames.

    ``official`` uses NIH's ``train_val_list.txt`` / ``test_list.txt`` found in ``list_folders`` (validation is
    ``val_fraction`` of the train_val patients); without those lists, or with ``random``, patients are split at
    random into ``test_fraction``, ``val_fraction`` and the rest.

    Raises:
        ValueError: for an unknown ``split``, fractions outside (0, 1), or a patient found in both official lists.
    """
    if split not in SPLITS:
        raise ValueError(f"split='{split}' is not supported; use one of {SPLITS}")
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must lie in (0, 1), sum < 1")
    lists = find_official_lists(*list_folders) if split == "official" else None
    patients = frame[KEY_PATIENT]
    if lists is not None:
        train_names, test_names = read_split_list(lists[0]), read_split_list(lists[1])
        in_test = frame[KEY_NAME].isin(test_names)
        in_train = frame[KEY_NAME].isin(train_names)
        crossing = set(patients[in_test]) & set(patients[in_train])
        if crossing:
            raise ValueError(
                f"patients {sorted(crossing)[:5]} appear in both {lists[0]} and {lists[1]}; the lists must be "
                "patient-disjoint"
            )
        unlisted = int((~in_test & ~in_train).sum())
        if unlisted:
            logger.warning("%d image(s) are in neither official list; they are left out", unlisted)
        test = frame[in_test]
        train_val = frame[in_train]
        val_patients, _ = patient_split(train_val[KEY_PATIENT], (val_fraction, 1.0 - val_fraction), seed)
        val = train_val[train_val[KEY_PATIENT].isin(val_patients)]
        train = train_val[~train_val[KEY_PATIENT].isin(val_patients)]
        logger.info("official split from %s", os.path.dirname(lists[0]))
    else:
        if split == "official":
            logger.info("no %s/%s found: using a patient-wise random split", OFFICIAL_TRAIN_LIST, OFFICIAL_TEST_LIST)
        fractions = (test_fraction, val_fraction, 1 - test_fraction - val_fraction)
        test_p, val_p, train_p = patient_split(patients, fractions, seed)
        test, val, train = (frame[patients.isin(p)] for p in (test_p, val_p, train_p))
    return {"train": train, "val": val, "test": test}


def frame_to_records(frame: pd.DataFrame, images_dir) -> tuple[list[dict], list[str]]:
    """Datalist items (``image`` path, ``label``, raw tabular fields, ``name``) for rows whose file exists.

    ``images_dir`` is one folder or several (`as_paths`); an image found in several is taken from the first.
    Returns the items and the names of listed images missing from every folder.
    """
    folders = as_paths(images_dir)
    records, missing = [], []
    for row in frame.itertuples(index=False):
        row = row._asdict()
        path = next((p for p in (os.path.join(f, row[KEY_NAME]) for f in folders) if os.path.isfile(p)), None)
        if path is None:
            missing.append(row[KEY_NAME])
            continue
        records.append({KEY_IMAGE: path, **row})
    return records, missing


def folder_records(input_dir: str, tabular_csv: str | None = None) -> list[dict]:
    """Datalist for inference: every readable-looking image under ``input_dir`` (PNG/JPEG, DICOM, NIfTI), sorted.

    Tabular fields come from ``tabular_csv`` (an NIH-format CSV matched on ``Image Index``) when given; DICOM files
    also fill them from their header at load time; anything else is encoded as missing.
    """
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input_dir '{input_dir}' is not a folder")
    paths = sorted(
        os.path.join(root, f) for root, _, files in os.walk(input_dir) for f in files if image_reader.is_supported(f)
    )
    records = join_tabular_csv([{KEY_IMAGE: p, KEY_NAME: os.path.relpath(p, input_dir)} for p in paths], tabular_csv)
    logger.info("found %d image file(s) under %s", len(records), input_dir)
    return records


def datalist_records(datalist: str, tabular_csv: str | None = None, key: str = "testing") -> list[dict]:
    """Datalist for inference from a JSON file: a list of items, or MONAI's decathlon format with the list under
    ``key``; each item has ``image`` (a path, relative to the JSON's folder or absolute) and optionally ``name``
    and the raw tabular fields (``age``, ``sex``, ``view``, ``follow_up``), which ``tabular_csv`` rows fill where
    absent.

    Raises:
        ValueError: naming the file and item for an item without ``image``.
    """
    with open(datalist) as f:
        loaded = json.load(f)
    items = loaded.get(key) if isinstance(loaded, dict) else loaded
    if not isinstance(items, list):
        raise ValueError(f"{datalist}: expected a list of items, or a dict with the list under '{key}'")
    base = os.path.dirname(os.path.abspath(datalist))
    records = []
    for i, item in enumerate(items):
        image = item.get(KEY_IMAGE) if isinstance(item, dict) else None
        if not isinstance(image, str) or not image:
            raise ValueError(f"{datalist}: item {i} has no '{KEY_IMAGE}' path")
        path = image if os.path.isabs(image) else os.path.join(base, image)
        records.append({**item, KEY_IMAGE: path, KEY_NAME: item.get(KEY_NAME) or image})
    return join_tabular_csv(records, tabular_csv)


def inference_records(
    input_dir: str | None = None, tabular_csv: str | None = None, datalist: str | None = None
) -> list[dict]:
    """`datalist_records` when ``datalist`` is given, else `folder_records` of ``input_dir``."""
    if datalist:
        return datalist_records(datalist, tabular_csv)
    if not input_dir:
        raise ValueError("give input_dir (a folder of images) or datalist (a JSON datalist)")
    return folder_records(input_dir, tabular_csv)


def join_tabular_csv(records: list[dict], tabular_csv: str | None) -> list[dict]:
    """``records`` with the fields of their ``tabular_csv`` row: NIH's age / sex / view / follow-up columns where the
    record has none, and every other column under ``clinical`` (declared ``tabular_fields`` and the risk model read
    them by column name).

    Rows are matched on ``Image Index`` (the file name) when the CSV has that column, else on ``Patient ID``; a
    warning counts the records without a row.

    Raises:
        ValueError: naming the file when it has neither key column, and the lines of a key listed twice.
    """
    if not tabular_csv:
        return records
    table = pd.read_csv(tabular_csv, dtype=str, keep_default_na=False)
    table.columns = [str(c).strip() for c in table.columns]
    key = COL_IMAGE if COL_IMAGE in table.columns else COL_PATIENT if COL_PATIENT in table.columns else None
    if key is None:
        raise ValueError(
            f"{tabular_csv}: needs a '{COL_IMAGE}' or '{COL_PATIENT}' column to match rows to images; "
            f"found {list(table.columns)}"
        )
    warn_unusable_fields(tabular_csv, table)
    keys = table[key].str.strip()
    repeated = keys[keys.duplicated(keep=False)]
    if len(repeated):
        lines = [int(i) + 2 for i in repeated.index[:2]]
        raise ValueError(f"{tabular_csv}: lines {lines[0]} and {lines[1]}: '{key}' {repeated.iloc[0]!r} listed twice")
    nih = {COL_AGE: KEY_AGE, COL_SEX: KEY_SEX, COL_VIEW: KEY_VIEW, COL_FOLLOW_UP: KEY_FOLLOW_UP}
    others = [c for c in table.columns if c not in nih and c not in (COL_IMAGE, COL_PATIENT)]
    rows = {
        k: {**{nih[c]: r[c] for c in nih if c in table.columns}, KEY_CLINICAL: {c: r[c] for c in others}}
        for k, (_, r) in zip(keys, table.iterrows())
    }
    out, unmatched = [], []
    for record in records:
        name = str(record[KEY_NAME])
        if key == COL_IMAGE:
            row = rows.get(os.path.basename(str(record[KEY_IMAGE])), rows.get(name))
        else:
            row = rows.get(str(record.get(KEY_PATIENT) or "").strip())
        if row is None:
            unmatched.append(name)
        out.append({**(row or {}), **{k: v for k, v in record.items() if v is not None}})
    if unmatched:
        logger.warning(
            "%d image(s) have no row in %s (matched on '%s'; e.g. %s); their tabular fields come from the DICOM "
            "header or are encoded as missing",
            len(unmatched),
            tabular_csv,
            key,
            unmatched[0],
        )
    return out


def _make_demo_once(demo_dir: str) -> str:
    """The demo set, generated by rank 0 alone in a distributed run while the other ranks wait."""
    import torch.distributed as dist

    from ..distributed import is_distributed
    from .demo import make_demo_dataset

    distributed = is_distributed()
    if distributed and dist.get_rank() != 0:
        dist.barrier()
        return make_demo_dataset(demo_dir)
    path = make_demo_dataset(demo_dir)
    if distributed:
        dist.barrier()
    return path


def _missing_input(dataset_dir: str, path: str, key: str, default: str, problem: str) -> str:
    """The message for a missing labels CSV or image folder, naming what the user typed: ``dataset_dir`` when the
    path is that folder's default, else the ``key``."""
    if os.path.abspath(path) == os.path.abspath(os.path.join(dataset_dir, default)):
        return f"dataset_dir '{dataset_dir}' has no {default}: pass --{key} <its path>, or check --dataset_dir"
    return f"{key} '{path}' {problem}"


@dataclass
class PreparedData:
    """Datalists of one run, the tabular encoder fitted on its training part, and where the data came from
    (``provenance``: synthetic or not, the folders and CSVs, the split rule and the images per split), which
    training saves with the model and the reports repeat."""

    train: list[dict]
    val: list[dict]
    test: list[dict]
    encoder: TabularEncoder
    label_counts: list[int] = field(default_factory=list)
    synthetic: bool = False
    provenance: dict = field(default_factory=dict)


def prepare_datasets(
    dataset_dir: str | None,
    labels_csv: str | None = None,
    images_dir: str | None = None,
    split: str = "official",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    output_dir: str | None = None,
    demo_dir: str = "demo_data",
    tabular_encoder_path: str | None = None,
    tabular_fields=None,
    tabular_csv: str | None = None,
    risk_model: str | None = None,
) -> PreparedData:
    """Read, split and list a dataset; fit (or load) the tabular encoder.

    ``labels_csv`` and ``images_dir`` each take one path or several (a list, or joined by ``os.pathsep``): the
    CSVs' rows are joined (`read_nih_csvs`) and each image is read from the first folder holding it, so sets such as
    NIH's 256 px images and a folder of thumbnails train as one.
    With ``dataset_dir=None`` a synthetic NIH-format demo set is generated once into ``demo_dir`` and used.
    The encoder is loaded from ``tabular_encoder_path`` when that file exists (evaluation and inference), else built
    from ``tabular_fields`` (the config's declaration; None: NIH's four fields), fitted on the training records and,
    when ``output_dir`` is given, saved there as ``tabular_encoder.json`` along with ``label_counts.json`` (training
    positives per finding). ``tabular_csv`` adds patient columns to every record (`join_tabular_csv`).
    With ``risk_model`` (a `risk.two_stage.save_models` JSON) the fields are instead the risk model's fields behind
    its stage-1 selected features, plus one token of its stage-2 probabilities (`TabularEncoder.for_risk_model`);
    the encoder JSON embeds the risk model, and a copy is saved as ``risk_model.json`` for inference's report.
    """
    synthetic = dataset_dir is None
    if synthetic:
        dataset_dir = _make_demo_once(demo_dir)
        logger.warning("no dataset_dir given: using the SYNTHETIC demo dataset in %s (not real X-rays)", dataset_dir)
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(
            f"dataset_dir '{dataset_dir}' is not a folder: point --dataset_dir at the NIH ChestX-ray14 folder "
            f"(with {DEFAULT_LABELS_CSV} and {DEFAULT_IMAGES_DIR}/), or leave it out to train on the demo set"
        )
    csvs = as_paths(labels_csv) or [os.path.join(dataset_dir, DEFAULT_LABELS_CSV)]
    folders = as_paths(images_dir) or [os.path.join(dataset_dir, DEFAULT_IMAGES_DIR)]
    for path in csvs:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                _missing_input(dataset_dir, path, "labels_csv", DEFAULT_LABELS_CSV, "does not exist")
            )
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                _missing_input(dataset_dir, folder, "images_dir", DEFAULT_IMAGES_DIR, "is not a folder")
            )
    labels_csv, images_dir = os.pathsep.join(csvs), os.pathsep.join(folders)
    frame = read_nih_csvs(csvs)
    list_folders = (dataset_dir, *(os.path.dirname(p) for p in csvs))
    parts = split_frame(frame, split, list_folders, val_fraction, test_fraction, seed)
    lists, missing = {}, []
    for name, part in parts.items():
        lists[name], lost = frame_to_records(part, folders)
        lists[name] = join_tabular_csv(lists[name], tabular_csv)
        missing += lost
    if missing:
        logger.warning(
            "%d image(s) listed in %s are missing from %s and are skipped (e.g. %s)",
            len(missing),
            labels_csv,
            images_dir,
            ", ".join(missing[:3]),
        )
    on_disk = {f for folder in folders for f in os.listdir(folder) if image_reader.is_supported(f)}
    unlisted = len(on_disk - set(frame[KEY_NAME]))
    if unlisted:
        logger.info("%d image file(s) in %s have no row in %s and are not used", unlisted, images_dir, labels_csv)
    if not lists["train"]:
        raise ValueError(f"no training images found: check labels_csv='{labels_csv}' and images_dir='{images_dir}'")
    logger.info("images: %s", ", ".join(f"{k} {len(v)}" for k, v in lists.items()))
    if tabular_encoder_path and os.path.isfile(tabular_encoder_path):
        encoder = TabularEncoder.load(tabular_encoder_path)
    elif risk_model:
        encoder = TabularEncoder.for_risk_model(risk_model).fit(lists["train"])
        logger.info(
            "tabular input from the risk model %s: fields %s and the stage-2 probabilities of %s",
            risk_model,
            [f.name for f in encoder.fields],
            list(encoder.risk.models),
        )
    else:
        encoder = TabularEncoder(tabular_fields).fit(lists["train"])
    for name, records in lists.items():  # NIH's own columns were checked line by line when the CSV was read
        encoder.report_invalid(records, f"{name} split", skip=RAW_TABULAR_KEYS)
    counts = np.sum([r[KEY_LABEL] for r in lists["train"]], axis=0).astype(int).tolist()
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        encoder.save(os.path.join(output_dir, "tabular_encoder.json"))
        if encoder.risk_model is not None:
            write_json_atomic(os.path.join(output_dir, "risk_model.json"), encoder.risk_model)
        summary = {"num_train": len(lists["train"]), "positives": dict(zip(LABELS, counts))}
        write_json_atomic(os.path.join(output_dir, "label_counts.json"), summary)
    provenance = {
        "source": "synthetic demo set (not X-rays)" if synthetic else "dataset",
        "synthetic": synthetic,
        "dataset_dir": os.path.abspath(dataset_dir),
        "labels_csv": [os.path.abspath(p) for p in csvs],
        "images_dir": [os.path.abspath(f) for f in folders],
        "split": split,
        "images": {name: len(items) for name, items in lists.items()},
    }
    return PreparedData(lists["train"], lists["val"], lists["test"], encoder, counts, synthetic, provenance)
