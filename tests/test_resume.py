"""Crash-safe checkpoints, resume and determinism (`medfusionnet.engine.resume`): two runs with one seed agree exactly, and a
run killed with SIGKILL after an epoch and resumed ends where an uninterrupted run ends."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from ignite.engine import Engine
from monai.handlers import CheckpointSaver

import medfusionnet
from medfusionnet.engine.resume import CHECKPOINT_FILE, TrainingCheckpoint, epoch_seed
from medfusionnet.files import save_torch_atomic

EPOCHS = 3


def _train_command(out, demo, *extra):
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "configs/train.yaml",
        "--network_size",
        "tiny",
        "--image_size",
        "64",
        "--max_epochs",
        str(EPOCHS),
        "--num_workers",
        "0",
        "--output_dir",
        str(out),
        "--demo_dir",
        str(demo),
        *map(str, extra),
    ]


def _train(out, demo, *extra):
    proc = subprocess.run(_train_command(out, demo, *extra), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _saved_epoch(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["epoch"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


def _kill_after_epoch(out, demo, epoch):
    """Start a training run and SIGKILL it as soon as its checkpoint records ``epoch``; returns that epoch."""
    proc = subprocess.Popen(_train_command(out, demo), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = out / CHECKPOINT_FILE
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if _saved_epoch(path) >= epoch:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return _saved_epoch(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two uninterrupted runs with one seed, and one killed after epoch 1 then resumed."""
    root = tmp_path_factory.mktemp("resume")
    demo = root / "demo"
    _train(root / "a", demo)
    _train(root / "b", demo)
    killed_at = _kill_after_epoch(root / "c", demo, 1)
    log = _train(root / "c", demo, "--resume", "true")
    return root, killed_at, log


def _metrics(run):
    report = json.loads((run / "metrics.json").read_text())
    return report["epoch"], report["mean"], {k: v["auc"] for k, v in report["per_class"].items()}


def _final_weights(run):
    return torch.load(run / CHECKPOINT_FILE, weights_only=True)["network"]


@pytest.mark.slow
def test_one_seed_gives_identical_runs(runs):
    root, _, _ = runs
    assert _metrics(root / "a") == _metrics(root / "b")  # exactly, on CPU
    for key, value in _final_weights(root / "a").items():
        assert torch.equal(value, _final_weights(root / "b")[key]), key


@pytest.mark.slow
def test_sigkill_then_resume_ends_where_an_uninterrupted_run_ends(runs):
    root, killed_at, log = runs
    assert 1 <= killed_at < EPOCHS, f"the run was killed after epoch {killed_at}; the test needs 1 <= k < {EPOCHS}"
    assert f"resumed from {root / 'c' / CHECKPOINT_FILE} after epoch {killed_at}" in log
    # every epoch before the kill is skipped, not repeated
    assert f"Epoch[{killed_at}] Complete" not in log and f"Epoch[{EPOCHS}] Complete" in log
    resumed, uninterrupted = _metrics(root / "c"), _metrics(root / "a")
    assert resumed[0] == uninterrupted[0]  # the same best epoch
    for got, want in zip(resumed[1:], uninterrupted[1:]):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-6, nan_ok=True), key
    weights = _final_weights(root / "a")
    for key, value in _final_weights(root / "c").items():
        torch.testing.assert_close(value, weights[key], rtol=1e-6, atol=1e-7)
    best = torch.load(root / "c" / "model.pt", weights_only=True)
    for key, value in torch.load(root / "a" / "model.pt", weights_only=True).items():
        torch.testing.assert_close(best[key], value, rtol=1e-6, atol=1e-7)


def test_resume_values_from_the_command_line():
    from medfusionnet.engine.resume import parse_resume

    assert [parse_resume(v) for v in (True, "true", "True", "yes", "1")] == [True] * 5
    assert [parse_resume(v) for v in (False, None, "false", "no", "0", "none")] == [False] * 6
    assert parse_resume("runs/a/checkpoint_last.pt") == "runs/a/checkpoint_last.pt"


def test_epoch_seeds_differ_by_epoch_and_seed():
    seeds = {epoch_seed(s, e) for s in range(3) for e in range(1, 50)}
    assert len(seeds) == 3 * 49 and all(0 <= s < 2**32 for s in seeds)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_FILE
    save_torch_atomic({"epoch": 1, "w": torch.ones(3)}, str(path))

    def full_disk(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"could not save {path} \(disk full\).*previous file is kept"):
        save_torch_atomic({"epoch": 2, "w": torch.zeros(3)}, str(path))
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.ones(3))
    assert os.listdir(tmp_path) == [CHECKPOINT_FILE]  # no temporary file left behind


def _handler(tmp_path, network, resume, saver=None):
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    return TrainingCheckpoint(str(tmp_path), network, optimizer, best_model_saver=saver, resume=resume)


def test_resume_refuses_weights_only_files_and_other_networks(tmp_path):
    torch.manual_seed(0)
    tiny = medfusionnet.create_network("medfusionnet", network_size="tiny", image_size=64)
    torch.save(tiny.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model.pt is not a training checkpoint"):
        _handler(tmp_path, tiny, str(tmp_path / "model.pt")).load(Engine(lambda e, b: None))
    engine = Engine(lambda e, b: None)
    other = medfusionnet.create_network("densenet121")
    _handler(tmp_path, other, False).save(engine)
    with pytest.raises(ValueError, match=rf"{CHECKPOINT_FILE} does not fit the configured network"):
        _handler(tmp_path, tiny, True).load(engine)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        _handler(tmp_path, tiny, str(tmp_path / "nowhere.pt")).load(engine)


def test_resume_true_without_a_checkpoint_starts_afresh_with_a_warning(tmp_path, caplog):
    net = medfusionnet.create_network("densenet121")
    engine = Engine(lambda e, b: None)
    _handler(tmp_path, net, True).load(engine)
    assert engine.state.epoch == 0 and "no training checkpoint" in caplog.text


def test_checkpoint_restores_optimiser_generators_and_the_best_model_record(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    saver = CheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_filename="model.pt")
    handler = _handler(tmp_path, net, False, saver)
    net(torch.rand(4, 3)).sum().backward()
    handler.optimizer.step()
    saver._key_metric_checkpoint._saved.append(saver._key_metric_checkpoint.Item(0.75, "model.pt"))
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.iteration = 4, 40
    handler.save(engine)
    expected_draw = torch.rand(5)  # what the generator gives after the save

    torch.manual_seed(123)
    fresh_net = torch.nn.Linear(3, 2)
    fresh_saver = CheckpointSaver(
        str(tmp_path), {"model": fresh_net}, save_key_metric=True, key_metric_filename="model.pt"
    )
    fresh = _handler(tmp_path, fresh_net, True, fresh_saver)
    resumed = Engine(lambda e, b: None)
    fresh.load(resumed)
    assert (resumed.state.epoch, resumed.state.iteration) == (4, 40)
    assert torch.equal(fresh_net.weight, net.weight)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == 1
    assert [(i.priority, i.filename) for i in fresh_saver._key_metric_checkpoint._saved] == [(0.75, "model.pt")]
    torch.testing.assert_close(torch.rand(5), expected_draw)
