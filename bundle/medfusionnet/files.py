"""Writing outputs safely: atomic file writes (a temporary file beside the target, flushed to disk, then renamed over
it, so a crash or a full disk at any moment leaves the previous file whole and no partial file behind), and a fresh
folder for each run's outputs, so one run never replaces another's."""

from __future__ import annotations

import errno
import json
import logging
import os
from typing import IO, Callable

logger = logging.getLogger(__name__)


def _write_atomic(path, mode: str, write: Callable[[IO], None]) -> None:
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the file
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        raise OSError(
            e.errno, f"could not save {path}{hint}: {e.strerror or e}; the previous file is kept", path
        ) from e


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically.

    Raises:
        OSError: with the original ``errno``, naming ``path`` (the previous file kept, no temporary file left).
    """
    _write_atomic(path, "w", lambda f: f.write(text))


def write_bytes_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so that a failed write keeps the previous file."""
    _write_atomic(path, "wb", lambda f: f.write(data))


def to_json(obj) -> str:
    """``obj`` as JSON text in the Model Zoo's layout: 4-space indent and a final newline."""
    return json.dumps(obj, indent=4) + "\n"


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` to ``path`` atomically as JSON (`to_json`).

    Raises:
        OSError: with the original ``errno``, naming ``path`` (the previous file kept, no temporary file left).
    """
    write_text_atomic(path, to_json(obj))


def save_torch_atomic(obj, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically.

    Raises:
        OSError: with the original ``errno``, naming ``path`` (the previous file kept, no temporary file left).
    """
    import torch

    _write_atomic(path, "wb", lambda f: torch.save(obj, f))


def fresh_folder(path: str, overwrite: bool = False) -> str:
    """``path`` when it does not exist, is empty or ``overwrite`` is true; else the first of ``path_2``,
    ``path_3``, ... that does not exist, so an earlier run's outputs are kept. The choice is logged; nothing is
    created."""
    chosen, n = str(path), 1
    while not overwrite and os.path.isdir(chosen) and os.listdir(chosen):
        n += 1
        chosen = f"{path}_{n}"
    if chosen != str(path):
        logger.info("%s holds an earlier run's outputs: this run writes to %s (overwrite=true replaces)", path, chosen)
    return chosen


def outputs_line(folder) -> str:
    """One line naming ``folder`` (absolute) and what it holds, sub-folders with a trailing ``/``: a script's
    last word to the user on where its outputs are."""
    folder = os.path.abspath(folder)
    names = sorted(n + "/" if os.path.isdir(os.path.join(folder, n)) else n for n in os.listdir(folder))
    return f"outputs in {folder}: {', '.join(names) if names else '(empty)'}"
