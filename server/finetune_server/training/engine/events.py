"""What the training loop reports while it runs: typed events handed to an `EventSink`.

The loop measures these itself (no log scraping). The worker turns them into the contract's TrainingProgress,
EvalResult, CheckpointSaved and LogLine messages; an in-process caller can consume them directly.
"""

from __future__ import annotations

import enum
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch

from finetune_server.training.engine.behaviour import ProbeAnswer


@dataclass(frozen=True)
class DeviceMemoryReading:
    """Allocated and peak tensor bytes on CUDA; the process's resident set and its peak on CPU."""

    device: str
    allocated_bytes: int
    peak_bytes: int
    reserved_bytes: int = 0  # CUDA only


@dataclass(frozen=True)
class ProgressEvent:
    step: int  # optimizer steps completed
    total_steps: int
    epoch: float  # fractional, e.g. 1.5
    loss: float  # mean token loss over the steps since the previous progress event
    learning_rate: float  # of the last step
    grad_norm: float  # global norm before clipping, of the last step
    tokens_per_second: float  # non-padding tokens since the previous progress event
    elapsed_s: float  # this attempt and the ones before it (resume)
    eta_s: float | None
    memory: DeviceMemoryReading
    tokens_seen: int  # non-padding tokens trained on so far


@dataclass(frozen=True)
class EvalEvent:
    step: int  # 0: the evaluation before training (probes and held-out generation only ask for one)
    eval_loss: float  # token-weighted mean over the eval set; NaN without one (probes only)
    perplexity: float
    is_best: bool
    metrics: dict[str, float] = field(default_factory=dict)  # exact_match, token_accuracy (held-out generation)
    probes: list[ProbeAnswer] = field(default_factory=list)


@dataclass(frozen=True)
class CheckpointEvent:
    step: int
    path: str  # relative to the output dir, e.g. checkpoints/step-00000100
    size_bytes: int


class LogLevel(enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class LogEvent:
    level: LogLevel
    message: str


Event = ProgressEvent | EvalEvent | CheckpointEvent | LogEvent
EventSink = Callable[[Event], None]


def read_device_memory(device: torch.device) -> DeviceMemoryReading:
    """A memory reading of `device`, cheap enough for every progress event (no device sync)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DeviceMemoryReading(
            device=f"cuda:{index}",
            allocated_bytes=int(torch.cuda.memory_allocated(index)),
            peak_bytes=int(torch.cuda.max_memory_allocated(index)),
            reserved_bytes=int(torch.cuda.memory_reserved(index)),
        )
    rss = int(_this_process().memory_info().rss)
    return DeviceMemoryReading(device=str(device), allocated_bytes=rss, peak_bytes=max(rss, _peak_rss_bytes()))


@functools.lru_cache(maxsize=1)
def _process(pid: int) -> psutil.Process:
    return psutil.Process(pid)


def _this_process() -> psutil.Process:
    """psutil's handle of this process, made once (it reads /proc to make one); by pid, as a forked worker is
    another process than the one that imported this module."""
    return _process(os.getpid())


_RU_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS


def _peak_rss_bytes() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * _RU_MAXRSS_UNIT
