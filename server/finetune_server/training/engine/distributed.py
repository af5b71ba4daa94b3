"""Several training processes under torchrun (DDP): who this process is, and how ranks agree.

Every rank trains; only rank 0 reports and writes (checkpoints, adapter, report). A write that fails on rank 0 is
announced to the others through an all-reduce, so no rank waits at a barrier for a peer that is gone. With one
process (WORLD_SIZE unset or 1) every helper here is a no-op that needs no process group.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from finetune_server.errors import ErrorKind
from finetune_server.training.engine.errors import TrainingError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def process_group_from_env() -> Iterator[None]:
    """Join the process group torchrun describes (WORLD_SIZE > 1) for the block; leave it if this call joined it."""
    created = _init_from_env()
    try:
        yield
    finally:
        if created:
            torch_dist.destroy_process_group()


def _init_from_env() -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch_dist.is_available() or torch_dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch_dist.init_process_group(backend=backend)
    return True


def dist_info() -> DistInfo:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return DistInfo(
            rank=torch_dist.get_rank(),
            world_size=torch_dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    return DistInfo()


def pick_device(device: torch.device | str | None, dist: DistInfo) -> torch.device:
    """The caller's device, else this rank's GPU, else the CPU. A CUDA device asked for where CUDA is unusable is
    an error (CUDA_UNAVAILABLE), never a quiet fall back to hours of fp32 on the CPU."""
    if device is not None:
        chosen = torch.device(device)
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError(
                ErrorKind.FAILED_PRECONDITION,
                "CUDA_UNAVAILABLE",
                f"training was placed on {chosen} but this worker sees no usable CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})",
                hint="Check the driver with nvidia-smi, and that the server's --slots do not exceed its GPUs.",
            )
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def wrap_ddp(model: torch.nn.Module, dist: DistInfo, device: torch.device) -> torch.nn.Module | None:
    """The DistributedDataParallel wrapper that averages gradients over ranks, or None with one process."""
    if dist.world_size <= 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def on_main_rank(dist: DistInfo, device: torch.device, step: int, what: str, write: Callable[[], None]) -> None:
    """Run `write` on rank 0 only, then let every rank know whether it failed.

    A plain barrier after a failed save would leave the other ranks waiting for a rank that is gone (until the
    process group's timeout, 30 minutes by default); this way they all stop at once, rank 0 with its own error.
    """
    error: Exception | None = None
    if dist.is_main:
        try:
            write()
        except Exception as exc:  # re-raised below, once the others know
            error = exc
    if dist.world_size > 1 and any_rank(error is not None, device) and error is None:
        raise TrainingError(
            ErrorKind.UNAVAILABLE,
            "PEER_FAILED",
            f"rank 0 failed while writing {what} at step {step}; its error says why",
            step=step,
        )
    if error is not None:
        raise error


def barrier(dist: DistInfo) -> None:
    if dist.world_size > 1:
        torch_dist.barrier()


def sum_across(value: int, dist: DistInfo, device: torch.device) -> int:
    if dist.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    torch_dist.all_reduce(tensor)
    return int(tensor.item())


def sum_tensors_across(dist: DistInfo, *tensors: torch.Tensor) -> None:
    """Sum each tensor over all ranks, in place and in the order given (every rank must give the same order)."""
    if dist.world_size == 1:
        return
    for tensor in tensors:
        torch_dist.all_reduce(tensor)


def gather_objects(dist: DistInfo, value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank (a collective: every rank must call it)."""
    if dist.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, value)
    return gathered


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is True on at least one rank (a collective: every rank must call it)."""
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return bool(tensor.item())
