"""Unreadable image files: the error that names a file and its reason, and the one path by which such a file becomes
a logged, counted skip instead of a stopped run.

1. `image_reader.read_xray` raises `UnreadableImageError` (the path and the reason).
2. `transforms.XrayDataset` catches it (`find_unreadable` looks through MONAI's wrapping of transform errors), logs
   it and returns a `placeholder`: a blank image through the same transform, marked under `SKIPPED_KEY` with the
   item's name, its file and the reason.
3. `collate_skipping_unreadable` drops the placeholders from the batch. In evaluation their marks travel on with
   the batch, under `SKIPPED_KEY`; in training a batch made only of placeholders raises, naming the files.
4. `SkipUnreadable` wraps an evaluation loader: it takes the marks off each batch before the engine sees it, keeps
   them in ``skipped`` for the current pass and leaves out batches left empty.
5. `engine.handlers.UnreadableImageReport` logs the count per epoch, and `engine.handlers.DecisionWriter` lists each
   skipped image with its reason.
"""

from __future__ import annotations

import numpy as np
from monai.data import list_data_collate

from ..constants import KEY_IMAGE, KEY_NAME

SKIPPED_KEY = "__unreadable__"


class UnreadableImageError(OSError):
    """An image file that cannot be decoded into a 2-D X-ray; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(str(path), reason)  # both kept in args, so the error pickles across worker processes
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read image '{self.path}': {self.reason}"


def find_unreadable(error: BaseException | None) -> UnreadableImageError | None:
    """The `UnreadableImageError` behind ``error`` (MONAI wraps transform errors), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UnreadableImageError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def placeholder(item: dict, transform, cause: UnreadableImageError) -> dict:
    """``item`` with a blank 32 x 32 image through ``transform`` (so shapes match the batch), marked for removal
    with its name, its file and ``cause``'s message."""
    blank = transform({**item, KEY_IMAGE: np.zeros((1, 32, 32), np.float32)})
    blank[SKIPPED_KEY] = {"name": str(item.get(KEY_NAME, cause.path)), "image": cause.path, "error": str(cause)}
    return blank


def collate_skipping_unreadable(batch: list[dict], train: bool = False):
    """`monai.data.list_data_collate` after dropping the placeholders of unreadable images.

    For evaluation (``train=False``) the placeholders' marks are kept in the batch under `SKIPPED_KEY` (when there
    are any), and a batch of only unreadable images becomes an empty batch (zero-length tensors of the right
    shapes). In training, where an empty batch cannot update batch norm, that raises `UnreadableImageError` naming
    the files instead.
    """
    good = [item for item in batch if SKIPPED_KEY not in item]
    marks = [item[SKIPPED_KEY] for item in batch if SKIPPED_KEY in item]
    if not good and train:
        raise UnreadableImageError(
            ", ".join(m["image"] for m in marks), "every image of this batch is unreadable; remove them"
        )
    if good:
        collated = list_data_collate(good)
    else:
        collated = list_data_collate([{k: v for k, v in item.items() if k != SKIPPED_KEY} for item in batch])
        collated = {k: v[:0] for k, v in collated.items()}
    if marks and not train:
        collated[SKIPPED_KEY] = marks
    return collated


class SkipUnreadable:
    """Iterates an evaluation data loader without the unreadable images: takes their marks off each batch into
    ``skipped`` (reset at the start of each pass) and leaves out the batches left empty.

    It has no length, so Ignite counts the iterations of the first epoch (evaluation runs a fixed set of files, so
    every run sees the same count). Other attributes (``dataset``, ``sampler``) are those of the loader.
    """

    def __init__(self, loader):
        self.loader = loader
        self.skipped: list[dict] = []

    def __iter__(self):
        self.skipped = []
        for batch in self.loader:
            self.skipped.extend(batch.pop(SKIPPED_KEY, []))
            if len(batch[KEY_IMAGE]):
                yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)
