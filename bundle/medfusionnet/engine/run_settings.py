"""The settings a training run saves for evaluation, inference and export to rebuild the same network."""

from __future__ import annotations

import json
import os

from ..distributed import is_main_process
from ..files import write_json_atomic

RUN_SETTINGS_FILE = "run_settings.json"


def save_run_settings(output_dir: str, **settings) -> None:
    """Write the settings that evaluation and inference must reuse (image size, network name) to
    ``<output_dir>/run_settings.json``; only the main process writes."""
    if not is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    write_json_atomic(os.path.join(output_dir, RUN_SETTINGS_FILE), settings)


def saved_setting(output_dir: str, key: str, default=None):
    """A setting saved by `save_run_settings` in ``output_dir``, or ``default`` when there is none.

    Raises:
        FileNotFoundError: when nothing was saved and no default is given.
    """
    path = os.path.join(output_dir, RUN_SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            settings = json.load(f)
        if key in settings:
            return settings[key]
    if default is None:
        raise FileNotFoundError(f"no '{key}' in {path}: train first, or pass --{key} explicitly")
    return default
