"""Crash-safe, resumable and reproducible training: an atomic end-of-epoch checkpoint of everything training needs
to continue (`TrainingCheckpoint`) and per-epoch reseeding that makes each epoch a function of its starting state
(`EpochSeeding`), so a run killed after epoch k and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import logging
import os
import random
from typing import Optional

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd

from ..files import save_torch_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint_last.pt"
FORMAT_VERSION = 1


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of (1-based) ``epoch`` in a run seeded with ``seed``: distinct per epoch, within 32 bits."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2**32)


class EpochSeeding:
    """Reseeds Python, NumPy and torch (dropout, drop-path, the data loader's worker seeds) and the training
    dataset's random transforms at the start of every epoch from ``(seed, epoch)``.

    Without this, the random streams of epoch k depend on everything drawn before it, and a resumed run would draw
    differently from an uninterrupted one.
    """

    def __init__(self, seed: int, dataset=None):
        self.seed = int(seed)
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``'s epoch start (before the epoch's data iterator is created)."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)

    def _epoch_started(self, engine: Engine) -> None:
        seed = epoch_seed(self.seed, engine.state.epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device
        if self.dataset is not None:  # worker processes reseed their copies from torch's generator
            set_rnd(self.dataset, seed)


def _rng_state() -> dict:
    """Random generator states, as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def parse_resume(value: bool | str | None) -> bool | str:
    """``resume`` as given in a config or on the command line: True, False, or a checkpoint path (the strings
    ``true``/``false``, ``yes``/``no``, ``1``/``0`` and ``none`` mean what they say)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip()
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0", "none", ""):
        return False
    return text


class TrainingCheckpoint:
    """After every training epoch (and its validation) writes ``<output_dir>/checkpoint_last.pt`` atomically (see
    `files.save_torch_atomic`): network, optimiser, learning-rate schedule, AMP scaler, epoch and iteration, the
    evaluator's best metric and epoch, the best-model saver's record (so a resumed run replaces ``model.pt`` only
    with a better epoch), the sampler's epoch and exponent, and the random generator states.

    With ``resume`` (True for ``<output_dir>/checkpoint_last.pt``, or a path), the state is loaded when training
    starts and training continues after the saved epoch; True without a checkpoint starts afresh with a warning, so
    one command line serves the first start and every restart. The schedule continues as saved (its ``T_max``).

    Attach it after the validation and learning-rate handlers (last in ``train_handlers``): handlers of one event run
    in the order they were attached. Under ``torchrun`` only rank 0 writes; every rank loads.

    Raises (when loading):
        FileNotFoundError: naming the path, when ``resume`` is a path that does not exist.
        ValueError: naming the file, when it is not a training checkpoint or does not fit the network.
    """

    def __init__(
        self,
        output_dir: str,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler=None,
        evaluator: Optional[Engine] = None,
        best_model_saver=None,
        sampler=None,
        resume: bool | str = False,
        filename: str = CHECKPOINT_FILE,
    ):
        self.path = os.path.join(output_dir, filename)
        self.network = network.module if hasattr(network, "module") else network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.evaluator = evaluator
        self.best_model_saver = best_model_saver
        self.sampler = sampler
        self.resume = parse_resume(resume)

    def attach(self, engine: Engine) -> None:
        """Load at ``STARTED`` when resuming; save at every ``EPOCH_COMPLETED``."""
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _best_record(self):
        """The best-model saver's Ignite `Checkpoint` (its record of saved scores), if any."""
        return getattr(self.best_model_saver, "_key_metric_checkpoint", None)

    def state_dict(self, engine: Engine) -> dict:
        """Everything `load` restores, as tensors and plain values."""
        state: dict = {
            "format": FORMAT_VERSION,
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": _rng_state(),
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        scaler = getattr(engine, "scaler_", None)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if self.evaluator is not None:
            state["best_metric"] = float(self.evaluator.state.best_metric)
            state["best_metric_epoch"] = int(self.evaluator.state.best_metric_epoch)
        record = self._best_record()
        if record is not None:
            state["best_model_saver"] = record.state_dict()
        if self.sampler is not None and hasattr(self.sampler, "power"):
            state["sampler"] = {"epoch": int(self.sampler.epoch), "power": float(self.sampler.power)}
        return state

    def save(self, engine: Engine) -> None:
        """Write the checkpoint of the epoch just completed (rank 0 only)."""
        from ..distributed import is_main_process

        if not is_main_process():
            return
        save_torch_atomic(self.state_dict(engine), self.path)
        logger.info("epoch %d: training state saved to %s", engine.state.epoch, self.path)

    def load(self, engine: Engine) -> None:
        """Restore the saved state into the network, optimiser, schedule, engines and generators."""
        path = self.path if self.resume is True else str(self.resume)
        if not os.path.isfile(path):
            if self.resume is True:
                logger.warning("resume: no training checkpoint at %s; starting from epoch 1", path)
                return
            raise FileNotFoundError(f"resume={path}: file not found")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "format" not in state or "network" not in state:
            raise ValueError(
                f"{path} is not a training checkpoint (written by {CHECKPOINT_FILE}'s saver); a "
                "model.pt holds weights only and cannot resume training"
            )
        own = self.network.state_dict()
        missing = [k for k in own if k not in state["network"]]
        unexpected = [k for k in state["network"] if k not in own]
        shapes = [k for k, v in state["network"].items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{path} does not fit the configured network: {len(missing)} parameter(s) missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unknown (e.g. {unexpected[:3]}), "
                f"{len(shapes)} of another shape (e.g. {shapes[:3]})"
            )
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler = getattr(engine, "scaler_", None)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if self.evaluator is not None and "best_metric" in state:
            self.evaluator.state.best_metric = state["best_metric"]
            self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        record = self._best_record()
        if record is not None and "best_model_saver" in state:
            record.load_state_dict(state["best_model_saver"])
        if self.sampler is not None and "sampler" in state and hasattr(self.sampler, "set_power"):
            self.sampler.set_power(state["sampler"]["power"])
            self.sampler.set_epoch(state["sampler"]["epoch"])
        _set_rng_state(state["rng"])
        engine.state.epoch = state["epoch"]
        engine.state.iteration = state["iteration"]
        logger.info("resumed from %s after epoch %d of %s", path, state["epoch"], engine.state.max_epochs)
