"""Fault injection for tests and chaos drills: make the failures we must survive happen on purpose, on a real server.

Set `FINETUNE_FAULTS` in the server's environment (workers inherit it), as comma-separated `name=N` pairs:

    FINETUNE_FAULTS="disk_full_at_checkpoint=2,oom_at_step=3" finetune serve ...

- `disk_full_at_checkpoint=N`: the Nth checkpoint a worker process saves fails with OSError(ENOSPC) after part of
  its files are written into the staging folder, as a full disk would fail it (so the atomic save is exercised).
- `kill_at_checkpoint=N`: the worker SIGKILLs itself in the middle of its Nth checkpoint write (a truncated file in
  the staging folder), as a power cut or the OOM killer would stop it. Once per job: a marker in the job's folder
  keeps the resumed attempt from dying the same way, so the drill shows the recovery.
- `oom_at_step=N`: the forward pass of optimizer step N raises torch.OutOfMemoryError, as a failed allocation would.
- `oom_at_model_load=N`: the Nth model load of a training worker raises torch.OutOfMemoryError once the weights are
  on the device (N=1: the first), as a model too big for the GPU would during setup.
- `unavailable_first_calls=N`: the server answers the first N calls of each FineTuneService method UNAVAILABLE
  before the servicer sees them, as a restarting server behind a proxy would (so callers' retry policies are tested).

Counts are per worker process: an attempt that resumes from a checkpoint counts its own saves from 1 again.
Unset or empty, nothing is injected and each hook costs one attribute test. The variable is read once per process;
an unknown name or a bad number raises ValueError, so a misspelt drill fails loudly instead of testing nothing.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
from dataclasses import dataclass, fields
from pathlib import Path

import structlog

ENV_VAR = "FINETUNE_FAULTS"

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Faults:
    disk_full_at_checkpoint: int = 0  # 0: never
    kill_at_checkpoint: int = 0
    oom_at_step: int = 0
    oom_at_model_load: int = 0
    unavailable_first_calls: int = 0

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


def parse(text: str) -> Faults:
    """`name=N` pairs separated by commas; whitespace and empty entries are ignored."""
    known = {f.name for f in fields(Faults)}
    values: dict[str, int] = {}
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, number = (part.strip() for part in entry.partition("="))
        if name not in known or not sep:
            raise ValueError(f"{ENV_VAR}: unknown fault {entry!r}; known: {', '.join(sorted(known))} (as name=N)")
        try:
            value = int(number)
        except ValueError:
            raise ValueError(f"{ENV_VAR}: {name} needs a whole number, got {number!r}") from None
        if value < 1:
            raise ValueError(f"{ENV_VAR}: {name} counts from 1, got {value}")
        values[name] = value
    return Faults(**values)


@functools.cache
def active() -> Faults:
    """The faults of this process, from the environment, read once."""
    faults = parse(os.environ.get(ENV_VAR, ""))
    if faults.any:
        log.warning("fault injection is on", **{f.name: getattr(faults, f.name) for f in fields(Faults)})
    return faults


_checkpoints_started = 0
KILL_FIRED_MARKER = ".fault-kill-at-checkpoint"  # in the job's folder: the kill drill fires once per job


def on_checkpoint_write(staging: Path) -> None:
    """Called by the checkpoint writer once per checkpoint, with part of its files already in `staging`."""
    global _checkpoints_started  # noqa: PLW0603 - a per-process counter is exactly what the faults count
    faults = active()
    if not (faults.disk_full_at_checkpoint or faults.kill_at_checkpoint):
        return
    _checkpoints_started += 1
    if _checkpoints_started == faults.kill_at_checkpoint:
        _kill_mid_write(staging)
    if _checkpoints_started != faults.disk_full_at_checkpoint:
        return
    # Leave a truncated file behind, as a real full disk does, so cleanup of the staging folder is tested too.
    half = _write_truncated(staging)
    log.warning("injecting a full disk", checkpoint=_checkpoints_started, staging=str(staging))
    raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV_VAR})", str(half))


def _kill_mid_write(staging: Path) -> None:
    marker = staging.parent.parent / KILL_FIRED_MARKER  # checkpoints/<staging> -> the job's folder
    if marker.exists():
        return
    marker.write_text(f"{staging.name}\n")
    _write_truncated(staging)  # half a file on disk, no complete marker, no rename
    log.warning("injecting a kill in the middle of a checkpoint write", staging=str(staging))
    os.kill(os.getpid(), signal.SIGKILL)


def _write_truncated(staging: Path) -> Path:
    """The first bytes of an optimizer state, durably on disk: what an interrupted torch.save leaves."""
    half = staging / "optimizer.pt"
    with half.open("wb") as handle:
        handle.write(b"\x80\x02truncated")
        handle.flush()
        os.fsync(handle.fileno())
    return half


def before_forward(step: int) -> None:
    """Called before each forward pass of optimizer step `step` (1-based)."""
    target = active().oom_at_step
    if target and step == target:
        import torch

        log.warning("injecting an out-of-memory error", step=step)
        raise torch.OutOfMemoryError(f"injected out of memory at step {step} ({ENV_VAR}); tried to allocate 2.00 GiB")


_model_loads = 0


def after_model_load() -> None:
    """Called by the training setup once the base model and its adapter are on the device."""
    global _model_loads  # noqa: PLW0603 - a per-process counter is exactly what the faults count
    target = active().oom_at_model_load
    if not target:
        return
    _model_loads += 1
    if _model_loads == target:
        import torch

        log.warning("injecting an out-of-memory error at model load", load=_model_loads)
        raise torch.OutOfMemoryError(f"injected out of memory at model load ({ENV_VAR}); tried to allocate 4.00 GiB")
