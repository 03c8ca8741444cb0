"""Checks of a checkpoint file against the configured network, before an engine loads it."""

from __future__ import annotations

import copy
import os

import torch


def check_checkpoint(path: str, network) -> None:
    """Refuse a checkpoint that does not fit ``network``, naming the mismatch (before the engine loads it).

    Raises:
        FileNotFoundError: naming ``path`` when it does not exist.
        ValueError: naming ``path`` and the first differing parameters (shape mismatch, e.g. another label set, or
            names missing on either side, e.g. another architecture).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found; train first or pass --ckpt_path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickled whole model (refused unrun), a text file, a truncated download
        if type(e).__name__ == "UnpicklingError":  # torch's weights-only refusal: many lines of advice, none apt here
            reason = (
                "Weights only load failed: it holds Python objects (e.g. a whole pickled model), which are never run, "
                "or it is not a PyTorch file; pass the model.pt that training writes"
            )
        else:
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise ValueError(f"checkpoint {path} cannot be read as a state dict: {reason}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    module = network.module if hasattr(network, "module") else network
    try:  # what the engine will do: a strict load, with the network's own upgrades of older layouts (e.g. 0.8.0's)
        copy.deepcopy(module).load_state_dict(state)
        return
    except (RuntimeError, KeyError):  # KeyError: an older layout with parts missing
        pass
    own = module.state_dict()
    shapes = [
        f"'{k}' is {tuple(v.shape)} in the checkpoint but {tuple(own[k].shape)} here"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if shapes:
        problems.append(
            f"{len(shapes)} parameter(s) differ in shape, e.g. {'; '.join(shapes[:3])} (another label "
            "set or network size?)"
        )
    if missing or unexpected:
        problems.append(
            f"{len(missing)} parameter(s) of this network are absent from the checkpoint (e.g. "
            f"{missing[:3]}) and {len(unexpected)} are unknown here (e.g. {unexpected[:3]}) (another "
            "architecture or ablation?)"
        )
    if problems:
        raise ValueError(f"checkpoint {path} does not fit the configured network: " + "; ".join(problems))
