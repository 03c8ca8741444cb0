"""Rank helpers for ``torchrun`` launches: whether a process group runs, which process writes, gathering objects."""

from __future__ import annotations

import torch


def is_distributed() -> bool:
    """Whether a torch.distributed process group is running (a ``torchrun`` launch)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """True on rank 0, or when not distributed: the process that writes checkpoints, reports and logs."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def gather_objects(values: list) -> list:
    """Every rank's ``values`` concatenated in rank order (``values`` itself when not distributed)."""
    if is_distributed():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, values)
        return [v for part in parts for v in part]
    return values


def finish_distributed() -> None:
    """End a ``torchrun`` process group cleanly: wait until every rank is done, then destroy the group.

    Without the barrier a rank that finishes first tears down its Gloo connections while a peer's worker threads
    still use them, and the process can abort at exit ("terminate called without an active exception").
    """
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
