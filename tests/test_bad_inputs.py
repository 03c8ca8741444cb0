"""Bad inputs of the catalogue in docs/reliability.md that no module-specific test file covers: each one ends in an
error naming the file, row or key, or in a logged skip or warning with a count."""

import ast
import errno
import logging
import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO

from medfusionnet.data.image_reader import read_xray
from medfusionnet.data.loaders import data_loader
from medfusionnet.data.nih import prepare_datasets, read_nih_csv
from medfusionnet.data.tabular import FEATURE_NAMES, TabularEncoder
from medfusionnet.data.transforms import XrayDataset, xray_transforms
from medfusionnet.engine.settings import check_training_settings

COLUMNS = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
]


@pytest.fixture
def encoder():
    return TabularEncoder().fit([{"age": 40, "follow_up": 2}, {"age": 60, "follow_up": 0}])


def _csv(tmp_path, rows):
    path = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=COLUMNS).to_csv(path, index=False)
    return str(path)


def _features(encoder, record):
    return dict(zip(FEATURE_NAMES, encoder.encode(record)))


# ------------------------------------------------------------------------------------------------------ DICOM


def _uncompressed(dicom_files):
    return next(p for p in dicom_files if p.name.startswith("1.3.6"))


def _dicom_with(dicom_files, path, **fields):
    import pydicom

    ds = pydicom.dcmread(_uncompressed(dicom_files))
    with warnings.catch_warnings():  # pydicom warns about the invalid values these tests write on purpose
        warnings.simplefilter("ignore")
        for name, value in fields.items():
            setattr(ds, name, value)
        ds.save_as(path)
    return str(path)


@pytest.mark.parametrize("age", ["0XXY", "412Y", "abc"])
def test_dicom_with_malformed_patient_age_is_missing_with_a_warning(dicom_files, tmp_path, encoder, caplog, age):
    path = _dicom_with(dicom_files, tmp_path / "age.dcm", PatientAge=age)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xray = read_xray(path)
        item = xray_transforms(encoder, 64, with_label=False)({"image": path, "name": "age.dcm"})
    assert xray.header["age"] == age and xray.array.shape == (1024, 1024)  # the image itself is still used
    assert caplog.text.count(f"{path}: PatientAge '{age}' is not a valid age") == 1  # once, though read twice
    tabular = dict(zip(FEATURE_NAMES, item["tabular"].tolist()))
    assert tabular["age"] == 0 and tabular["age_missing"] == 1
    assert tabular["sex_M"] == 1  # the other header fields are kept


def test_dicom_with_a_lateral_view_is_missing_with_a_warning(dicom_files, tmp_path, encoder, caplog):
    path = _dicom_with(dicom_files, tmp_path / "lateral.dcm", ViewPosition="LL")
    with caplog.at_level(logging.WARNING):
        item = xray_transforms(encoder, 64, with_label=False)({"image": path, "name": "lateral.dcm"})
    assert f"{path}: ViewPosition 'LL' is neither PA nor AP" in caplog.text
    tabular = dict(zip(FEATURE_NAMES, item["tabular"].tolist()))
    assert (tabular["view_PA"], tabular["view_AP"], tabular["view_missing"]) == (0, 0, 1)


def test_valid_dicom_headers_log_no_warning(dicom_files, caplog):
    with caplog.at_level(logging.WARNING):
        for path in dicom_files:
            read_xray(str(path))
    assert "PatientAge" not in caplog.text and "ViewPosition" not in caplog.text


# ------------------------------------------------------------------------------------------------- NIH CSV


def test_csv_ages_0_412_nan_and_text_reach_the_encoding_as_documented(tmp_path, encoder, caplog):
    ages = ["0", "412", "NaN", "abc", "", "058Y"]
    rows = [[f"{i}.png", "Mass", 0, i, age, "F", "PA"] for i, age in enumerate(ages)]
    with caplog.at_level(logging.WARNING):
        frame = read_nih_csv(_csv(tmp_path, rows))
    years = frame["age"].tolist()
    assert years[0] == 0.0 and years[5] == 58.0 and all(np.isnan(years[1:5]))
    assert "3 row(s) have an unparseable or implausible 'Patient Age' (e.g. line 3: '412')" in caplog.text
    encoded = [_features(encoder, row) for row in frame.to_dict("records")]
    assert [e["age_missing"] for e in encoded] == [0, 1, 1, 1, 1, 0]
    assert encoded[0]["age"] == pytest.approx(
        (0 - encoder.stats_["age"]["mean"]) / encoder.stats_["age"]["std"]
    )  # 0 is a real age
    assert all(e["age"] == 0 for e in encoded[1:5])  # missing: no made-up value


def test_unknown_view_position_and_sex_are_missing_with_a_counted_warning(tmp_path, encoder, caplog):
    rows = [
        ["a.png", "Mass", 0, 1, 50, "M", "PA"],
        ["b.png", "Mass", 0, 2, 50, "F", "LL"],
        ["c.png", "Mass", 0, 3, 50, "O", "LATERAL"],
        ["d.png", "Mass", 0, 4, 50, "", ""],
    ]
    with caplog.at_level(logging.WARNING):
        frame = read_nih_csv(_csv(tmp_path, rows))
    assert "2 row(s) have an unknown 'View Position' (e.g. line 3: 'LL'; known: PA, AP)" in caplog.text
    assert "1 row(s) have an unknown 'Patient Gender' (e.g. line 4: 'O'; known: M, F)" in caplog.text
    encoded = [_features(encoder, row) for row in frame.to_dict("records")]
    assert [e["view_missing"] for e in encoded] == [0, 1, 1, 1]
    assert [e["sex_missing"] for e in encoded] == [0, 0, 1, 1]


def test_inference_tabular_csv_with_unusable_values_warns(nih_dir, tmp_path, caplog):
    from medfusionnet.data.nih import folder_records

    images = tmp_path / "images"
    images.mkdir()
    (images / "00000002_000.png").symlink_to(nih_dir / "images_256" / "00000002_000.png")
    table = tmp_path / "tabular.csv"
    table.write_text("Image Index,Patient Age,Patient Gender,View Position\n00000002_000.png,0XXY,M,LL\n")
    with caplog.at_level(logging.WARNING):
        records = folder_records(str(images), str(table))
    assert f"{table}: 1 row(s) have an unparseable or implausible 'Patient Age' (e.g. line 2: '0XXY')" in caplog.text
    assert f"{table}: 1 row(s) have an unknown 'View Position' (e.g. line 2: 'LL'" in caplog.text
    assert records[0]["age"] == "0XXY"  # kept raw; the encoder turns it into "missing"


def test_images_on_disk_without_a_csv_row_are_counted_and_left_out(nih_dir, tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    listed = ["00000002_000.png", "00000075_000.png", "00000100_000.png"]
    for name in listed + ["00000129_000.png", "extra.png"]:  # the last two have no row
        (images / name).symlink_to(nih_dir / "images_256" / (name if name != "extra.png" else listed[0]))
    (images / "notes.txt").write_text("not an image: not counted")
    rows = [[name, "No Finding", 0, i, 50, "M", "PA"] for i, name in enumerate(listed)]
    with caplog.at_level(logging.INFO):
        data = prepare_datasets(str(tmp_path), _csv(tmp_path, rows), str(images), split="random")
    assert f"2 image file(s) in {images} have no row in {tmp_path / 'labels.csv'} and are not used" in caplog.text
    used = {r["name"] for r in data.train + data.val + data.test}
    assert used == set(listed)


# ------------------------------------------------------------------------------------ unreadable image files


def _bad_image_files(nih_dir, dicom_files, tmp_path):
    import nibabel as nib
    import pydicom

    good = nih_dir / "images_256" / "00000075_000.png"
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is a note, not a PNG")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:4000])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), tmp_path / "volume.nii.gz")
    ds = pydicom.dcmread(_uncompressed(dicom_files))
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    names = ["zero.png", "text.png", "truncated.png", "volume.nii.gz", "nopixels.dcm"]
    return [str(good)] + [str(tmp_path / n) for n in names]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_files_are_skipped_and_counted_per_epoch(
    nih_dir, dicom_files, tmp_path, encoder, caplog, num_workers
):
    from ignite.engine import Engine

    from medfusionnet.engine.handlers import UnreadableImageReport

    paths = _bad_image_files(nih_dir, dicom_files, tmp_path)
    records = [{"image": p, "name": os.path.basename(p), "label": np.zeros(14, np.float32)} for p in paths]
    loader = data_loader(XrayDataset(records, xray_transforms(encoder, 64)), batch_size=2, num_workers=num_workers)
    seen = []
    engine = Engine(lambda engine, batch: seen.extend(batch["name"]))
    engine.data_loader = loader  # as MONAI's workflows set it
    UnreadableImageReport().attach(engine)
    with caplog.at_level(logging.WARNING):
        engine.run(loader, max_epochs=1)
    assert seen == ["00000075_000.png"] and engine.state.skipped_images == 5
    assert "5 of 6 image(s) were unreadable and skipped by this run" in caplog.text  # an evaluation: no epochs
    if num_workers == 0:  # a worker process logs the file names in its own process
        for path in paths[1:]:
            assert f"skipping unreadable image: cannot read image '{path}'" in caplog.text


def test_training_drops_an_unreadable_remainder_and_names_a_full_unreadable_batch(
    nih_dir, dicom_files, tmp_path, encoder, caplog
):
    from ignite.engine import Engine

    from medfusionnet.data.unreadable import UnreadableImageError
    from medfusionnet.engine.handlers import UnreadableImageReport

    good, *bad = _bad_image_files(nih_dir, dicom_files, tmp_path)

    def run(paths):
        records = [{"image": p, "name": os.path.basename(p), "label": np.zeros(14, np.float32)} for p in paths]
        loader = data_loader(XrayDataset(records, xray_transforms(encoder, 64)), batch_size=2, train=True)
        seen = []
        engine = Engine(lambda engine, batch: seen.extend(batch["name"]))
        engine.data_loader = loader
        engine.optimizer = None  # a trainer, as MONAI's SupervisedTrainer is
        UnreadableImageReport().attach(engine)
        engine.run(loader, max_epochs=1)
        return seen, engine

    # 5 images in batches of 2: the last, incomplete batch (one unreadable file) is dropped, not fatal
    with caplog.at_level(logging.WARNING):
        seen, engine = run([good, bad[0], good, good, bad[1]])
    assert seen == ["00000075_000.png"] * 3 and engine.state.skipped_images == 1
    assert "1 of 4 image(s) were unreadable and skipped in epoch 1" in caplog.text
    # a full batch of unreadable files stops training with their names
    with pytest.raises(UnreadableImageError, match=r"zero.png.*text.png.*every image of this batch is unreadable"):
        run([good, good, bad[0], bad[1]])


# ------------------------------------------------------------------------------------------ training settings

DEFAULTS = dict(
    batch_size=16,
    val_batch_size=32,
    max_epochs=5,
    val_interval=1,
    num_workers=2,
    seed=0,
    image_size=64,
    network_name="medfusionnet",
    network_size="base",
    split="official",
    val_fraction=0.1,
    test_fraction=0.2,
    cache=None,
    learning_rate=3e-4,
    weight_decay=1e-4,
    loss_name="focal",
    focal_gamma=2.0,
    class_weight_power=0.5,
    asl_gamma_neg=4.0,
    asl_clip=0.05,
    sampling="balanced",
    max_repeats=3,
    no_finding_factor=0.5,
    curriculum_epochs=2,
    log_interval=20,
    amp_dtype="float16",
    warmup_epochs=1,
    fusion_lr_scale=1.0,
    gate_lr_scale=30.0,
    aux_loss_weight=0.3,
)


def test_default_training_settings_pass():
    check_training_settings(**DEFAULTS)
    check_training_settings(**{**DEFAULTS, "network_name": "densenet121", "image_size": 100})  # no stride rule
    check_training_settings()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("batch_size", "abc", "batch_size='abc' (str) is not valid: use an integer >= 1"),
        ("batch_size", 0, "batch_size=0 (int) is not valid: use an integer >= 1"),
        ("batch_size", 16.0, "batch_size=16.0 (float) is not valid: use an integer >= 1"),
        ("batch_size", True, "batch_size=True (bool) is not valid"),
        ("max_epochs", -1, "max_epochs=-1 (int) is not valid: use an integer >= 1"),
        (
            "image_size",
            100,
            "image_size=100 is not valid for network_name='medfusionnet': use a multiple of 32 " "(e.g. 96 or 128)",
        ),
        ("image_size", 16, "image_size=16 (int) is not valid: use an integer >= 32"),
        ("val_fraction", 2, "val_fraction=2 (int) is not valid: use a number in (0, 1)"),
        ("test_fraction", 0.9, "val_fraction=0.1 and test_fraction=0.9 add up to 1: their sum must stay below 1"),
        ("sampling", "sometimes", "sampling='sometimes' (str) is not valid: use one of ['balanced', 'natural']"),
        (
            "loss_name",
            "xyz",
            "loss_name='xyz' (str) is not valid: use one of ['bce', 'focal', 'asl', 'focal_asl', " "'bce_focal']",
        ),
        ("amp_dtype", "float8", "amp_dtype='float8' (str) is not valid: use one of ['bfloat16', 'float16']"),
        ("learning_rate", float("nan"), "learning_rate=nan (float) is not valid: use a number > 0"),
        ("learning_rate", "fast", "learning_rate='fast' (str) is not valid: use a number > 0"),
        ("split", "official_v2", "split='official_v2' (str) is not valid: use one of ['official', 'random']"),
        ("cache", "ram", "cache='ram' (str) is not valid: use one of [None, 'none', 'memory', 'disk']"),
        ("network_name", "resnet", "network_name='resnet' (str) is not valid: use one of ["),
        ("warmup_epochs", 5, "warmup_epochs=5 is not valid: use fewer than max_epochs=5"),
        ("warmup_epochs", 0.5, "warmup_epochs=0.5 (float) is not valid: use an integer >= 0"),
        ("gate_lr_scale", 0, "gate_lr_scale=0 (int) is not valid: use a number > 0"),
        ("aux_loss_weight", -0.1, "aux_loss_weight=-0.1 (float) is not valid: use a number >= 0"),
    ],
)
def test_bad_training_setting_is_named(key, value, message):
    with pytest.raises(ValueError) as info:
        check_training_settings(**{**DEFAULTS, key: value})
    assert message in str(info.value)


def test_unknown_training_setting_is_refused():
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['batchsize'\]"):
        check_training_settings(batchsize=16)


@pytest.mark.parametrize("config", ["configs/train.yaml", "configs/multi_gpu_train.yaml"])
def test_training_configs_check_their_settings_first(config):
    from monai.bundle import ConfigParser

    lines = ConfigParser.load_config_file(str(REPO / config))["initialize"]
    # the keys computed from others come last, so a bad batch_size or max_epochs is named before an expression
    # built on it fails
    assert lines[:2] == ["@training_settings", "@derived_settings"]


def _initialize_training(tmp_path, **overrides):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(REPO / "configs" / "train.yaml"),
        workflow_type="train",
        output_dir=str(tmp_path / "out"),
        demo_dir=str(tmp_path / "demo"),
        **overrides,
    )
    workflow.initialize()


@pytest.mark.parametrize(
    "key, value",
    [
        ("batch_size", "abc"),
        ("max_epochs", "abc"),
        ("image_size", 100),
        ("amp_dtype", "float8"),
        ("curriculum_epochs", -1),
    ],
)
def test_train_config_check_names_a_bad_override_before_training(tmp_path, monkeypatch, key, value):
    monkeypatch.chdir(tmp_path)  # any working directory
    with pytest.raises(RuntimeError) as info:
        _initialize_training(tmp_path, **{key: value})
    assert isinstance(info.value.__cause__, ValueError) and f"{key}={value!r}" in str(info.value.__cause__)
    assert not (tmp_path / "demo").exists() and not (tmp_path / "out" / "run_settings.json").exists()


def test_train_config_check_passes_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _initialize_training(tmp_path)
    assert (tmp_path / "out" / "run_settings.json").is_file()


# ---------------------------------------------------------------------------------------------------- full disk


def _fail_after(real_write, written: int):
    def write(data):
        real_write(data[:written])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def test_risk_model_save_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    from medfusionnet import files
    from medfusionnet.risk import two_stage

    rng = np.random.default_rng(0)
    x = pd.DataFrame({"x": rng.integers(18, 70, 200).astype(float)})
    y = (x["x"] > 40).astype(int).to_numpy()
    model = two_stage.TwoStageRiskModel(top_n=1, max_depth=1).fit(x, y)
    path = tmp_path / "model.json"
    two_stage.save_models(path, {"y": model})
    before = path.read_bytes()
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            f.write = _fail_after(f.write, 100)
        return f

    monkeypatch.setattr(files, "open", full_disk_open, raising=False)
    with pytest.raises(OSError) as info:
        two_stage.save_models(path, {"y": model, "again": model})
    assert info.value.errno == errno.ENOSPC and f"could not save {path} (disk full)" in str(info.value)
    assert path.read_bytes() == before and not (tmp_path / "model.json.tmp").exists()
    monkeypatch.undo()
    np.testing.assert_array_equal(two_stage.load_models(path)["y"].predict_proba(x), model.predict_proba(x))


def test_prepare_nih_on_a_full_disk_keeps_the_previous_image(tmp_path, monkeypatch):
    import importlib.util

    from PIL import Image

    spec = importlib.util.spec_from_file_location("prepare_nih", REPO / "scripts" / "prepare_nih.py")
    prepare_nih = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_nih)
    source, target = tmp_path / "source.png", tmp_path / "00000001_000.png"
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(source)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(target)
    before = target.read_bytes()
    real_save = Image.Image.save

    def full_disk_save(image, fp, *args, **kwargs):
        real_save(image, fp, *args, **kwargs)
        with open(fp, "r+b") as f:  # a partial file, as a full disk leaves it
            f.truncate(20)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full_disk_save)
    name, error = prepare_nih._convert_file(str(source), str(target), 16)
    assert name == target.name and error == f"OSError: [Errno 28] No space left on device: '{target}'"
    assert target.read_bytes() == before and not (tmp_path / f"{target.name}.tmp").exists()


# ------------------------------------------------------------------------------------------------------ security

SOURCE_DIRS = ("bundle", "scripts", "monailabel_app")


def _python_files():
    return sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))


def test_every_torch_load_passes_weights_only_true():
    calls, unsafe = 0, []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        torch_names = {"torch"} | {
            a.asname
            for n in ast.walk(tree)
            if isinstance(n, ast.Import)
            for a in n.names
            if a.name == "torch" and a.asname
        }
        load_names = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module == "torch"
            for a in n.names
            if a.name == "load"
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            is_load = (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and isinstance(func.value, ast.Name)
                and func.value.id in torch_names
            ) or (isinstance(func, ast.Name) and func.id in load_names)
            if not is_load:
                continue
            calls += 1
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert calls >= 5, "the scan found too few torch.load calls: is it still looking at the right files?"
    assert not unsafe, f"torch.load without weights_only=True at {unsafe}"


def test_no_pickle_based_serialisation():
    banned = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}
    found = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in banned]
            if isinstance(node, ast.Attribute) and node.attr in ("read_pickle", "to_pickle"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.attr}")
    assert not found, f"pickle-based serialisation at {found}"


def _touch(path):
    open(path, "w").close()


class Exploit:
    """An object whose unpickling would run code (it creates a marker file), to show it is never unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


def test_a_checkpoint_holding_code_is_refused_unrun(tmp_path):
    from medfusionnet import create_network
    from medfusionnet.engine.checkpoints import check_checkpoint

    net = create_network("medfusionnet", network_size="tiny", image_size=64)
    marker = tmp_path / "code_ran"
    torch.save({"model": net.state_dict(), "extra": Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        check_checkpoint(str(tmp_path / "evil.pt"), net)
    assert not marker.exists()


def test_a_second_inference_run_keeps_the_first_runs_outputs(tmp_path):
    from medfusionnet.files import fresh_folder

    base = tmp_path / "inference"
    assert fresh_folder(str(base)) == str(base)  # nothing there yet
    base.mkdir()
    assert fresh_folder(str(base)) == str(base)  # an empty folder is reused
    (base / "decisions.json").write_text("{}")
    assert fresh_folder(str(base)) == f"{base}_2"
    (tmp_path / "inference_2").mkdir()
    (tmp_path / "inference_2" / "decisions.json").write_text("{}")
    assert fresh_folder(str(base)) == f"{base}_3"
    assert fresh_folder(str(base), overwrite=True) == str(base)
