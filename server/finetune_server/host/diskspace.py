"""Refuse work that would fill the disk: a job's checkpoints or an export need room, and a full disk mid-write is
the most common way to lose work. The check is made before starting, with a reserve left free for everything else."""

from __future__ import annotations

import shutil
from pathlib import Path

from finetune_server.errors import ErrorKind, FinetuneError

GIB = 1 << 30


def ensure_free_space(folder: Path, needed_bytes: int, reserve_bytes: int, what: str) -> None:
    """FAILED_PRECONDITION, saying how much is needed and how much is free, unless `folder`'s disk has room."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes + reserve_bytes:
        raise FinetuneError(
            ErrorKind.FAILED_PRECONDITION,
            "INSUFFICIENT_DISK",
            f"{what} needs about {needed_bytes / GIB:.2f} GiB plus the {reserve_bytes / GIB:.2f} GiB kept free, "
            f"but only {free / GIB:.2f} GiB is free under {folder}",
            hint="Free disk space (old jobs' checkpoints and artifacts live under the data dir) or lower "
            "save_total_limit.",
            metadata={"needed_bytes": str(needed_bytes + reserve_bytes), "free_bytes": str(free)},
        )


def job_disk_bytes(trainable_parameters: int, save_total_limit: int) -> int:
    """Checkpoints (adapter + AdamW's two states, fp32) kept at once, plus the final adapter."""
    per_checkpoint = trainable_parameters * 4 * 3
    kept = save_total_limit if save_total_limit > 0 else 10  # "keep all": plan for ten
    return per_checkpoint * (kept + 1) + trainable_parameters * 4


def export_disk_bytes(base_parameters: int, trainable_parameters: int, merged: bool) -> int:
    """A merged export writes the whole model at 32 bits on the CPU (16 on a GPU: the larger is planned for)."""
    return base_parameters * 4 if merged else trainable_parameters * 4
