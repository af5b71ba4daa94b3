"""How training fails, in terms a caller can act on: each is a FinetuneError that also says at which step.

The worker reports `reason`, `message`, `hint` and `step` as the contract's JobError. `TrainingCancelled` is not an
error: the job was asked to stop and stopped cleanly. This module is also where raw failures (a non-finite loss, an
allocation that failed, a full disk) become these errors, in one place. The server process imports it for
`out_of_memory_hint`, so it imports no torch at module level.
"""

from __future__ import annotations

import contextlib
import errno
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_server.errors import ErrorKind, FinetuneError, Violation

if TYPE_CHECKING:
    from finetune_server.training.config import TrainingConfig


class TrainingError(FinetuneError):
    """A failure during training; `step` is the optimizer step it happened at (0 before the first)."""

    def __init__(
        self,
        kind: ErrorKind,
        reason: str,
        message: str,
        *,
        step: int = 0,
        hint: str = "",
        violations: list[Violation] | None = None,
    ) -> None:
        super().__init__(kind, reason, message, hint=hint, violations=violations, metadata={"step": str(step)})
        self.step = step


class NanLossError(TrainingError):
    def __init__(self, step: int, learning_rate: float) -> None:
        super().__init__(
            ErrorKind.FAILED_PRECONDITION,
            "NAN_LOSS",
            f"the training loss became NaN or infinite at step {step} (learning rate {learning_rate:.3g})",
            step=step,
            hint="Lower learning_rate (e.g. by 10x), keep max_grad_norm at 1.0, or use bf16 instead of fp16.",
        )


def raise_if_not_finite(loss: float, *, step: int, learning_rate: float) -> None:
    if not math.isfinite(loss):
        raise NanLossError(step, learning_rate)


class OutOfMemoryError(TrainingError):
    def __init__(
        self,
        step: int,
        device: str,
        detail: str,
        config: TrainingConfig | None = None,
        *,
        during: str = "",
        gpu: GpuFacts | None = None,
    ) -> None:
        super().__init__(
            ErrorKind.RESOURCE_EXHAUSTED,
            "OUT_OF_MEMORY",
            f"{device} ran out of memory {during or f'at step {step}'}: {detail}",
            step=step,
            hint=out_of_memory_hint(config, gpu=gpu),
        )


@dataclass(frozen=True)
class GpuFacts:
    """What the hints need to know of the GPU a run failed on."""

    bf16_supported: bool  # compute capability 8.0+ (emulated bf16 on older cards is slower than fp32)


def out_of_memory_hint(config: TrainingConfig | None, *, gpu: GpuFacts | None = None) -> str:
    """Settings to try next, computed from the run's own values (halve the micro-batch, keep the effective batch).

    `gpu`: the GPU the run failed on; None when it was the CPU or is not known (then GPU-only savings are offered
    as "CUDA only" only when the device is not known).
    """
    if config is None:
        return (
            "Use a smaller per_device_train_batch_size (raise gradient_accumulation_steps to keep the effective "
            "batch), a smaller max_length, gradient_checkpointing, or load_in_8bit / load_in_4bit."
        )
    batch = int(config.per_device_train_batch_size or 1)
    accum = int(config.gradient_accumulation_steps or 1)
    max_length = int(config.max_length or 2048)
    tries = []
    if batch > 1:
        smaller = max(d for d in range(1, batch // 2 + 1) if batch % d == 0)  # a divisor keeps the batch exact
        tries.append(
            f"per_device_train_batch_size={smaller} with gradient_accumulation_steps={accum * batch // smaller} "
            f"(the same effective batch of {batch * accum})"
        )
    if not config.gradient_checkpointing:
        tries.append("gradient_checkpointing=true")
    quantized = bool(config.load_in_4bit or config.load_in_8bit)
    if gpu is not None and not (config.bf16 or config.fp16) and not quantized:
        # fp32 weights take twice the memory of 16-bit ones; bf16 needs no loss scaling, fp16 does (older GPUs).
        tries.append("bf16=true (16-bit weights)" if gpu.bf16_supported else "fp16=true (16-bit weights)")
    if max_length > 64:
        tries.append(f"max_length={max_length // 2} (longer examples are truncated)")
    if not config.load_in_4bit:
        tries.append("load_in_4bit=true (QLoRA" + (")" if gpu is not None else ", CUDA only)"))
    if gpu is not None and config.optim != "paged_adamw_8bit":
        tries.append("optim=paged_adamw_8bit (8-bit optimizer states, paged to host memory under pressure)")
    if not tries:
        return "Every memory saving is already on: choose a smaller model, or a device with more memory."
    return "Try, one at a time: " + "; ".join(tries) + "."


# A failed allocation as a RuntimeError: the CPU allocator's, CUDA's own, and cuBLAS/cuDNN failing to allocate their
# workspace (`CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)`: the GPU was full before the first matmul).
_OOM_WORDS = ("out of memory", "can't allocate memory", "_STATUS_ALLOC_FAILED")


def out_of_memory_error(
    exc: BaseException, *, step: int, device: str, config: TrainingConfig, during: str = ""
) -> OutOfMemoryError | None:
    """The OUT_OF_MEMORY error that `exc` amounts to, or None when it is no failed allocation.

    torch raises torch.OutOfMemoryError on CUDA, but a plain RuntimeError ("can't allocate memory") when the CPU
    allocator fails, or a cuBLAS status; Python itself raises MemoryError.
    """
    import torch  # only the training worker calls this; the server imports this module without torch

    gpu = gpu_facts(device)
    if isinstance(exc, MemoryError):
        detail = "the process could not allocate host memory"
    elif isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(words in str(exc) for words in _OOM_WORDS)
    ):
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    else:
        return None
    return OutOfMemoryError(step, device, detail, config, during=during, gpu=gpu)


def gpu_facts(device: str) -> GpuFacts | None:
    """The hints' facts of `device` when it is a usable CUDA device, else None."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    major, _ = torch.cuda.get_device_capability(torch.device(device))
    return GpuFacts(bf16_supported=major >= 8)


@contextlib.contextmanager
def out_of_memory_as_error(
    step: Callable[[], int], device: str, config: TrainingConfig, *, during: str = ""
) -> Iterator[None]:
    """A failed allocation in the block becomes OUT_OF_MEMORY (a typed error: the job fails at once with the hints,
    it is not retried into the same failure); anything else passes through. `step()` says at which step."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        oom = out_of_memory_error(exc, step=step(), device=device, config=config, during=during)
        if oom is None:
            raise
        raise oom from exc


class DiskFullError(TrainingError):
    """The disk filled up while writing; the write was undone, so the newest complete checkpoint is still usable."""

    def __init__(
        self,
        step: int,
        what: str,
        folder: str,
        detail: str,
        *,
        needed_bytes: int,
        free_bytes: int,
        newest_checkpoint_step: int | None,
        save_total_limit: int,
    ) -> None:
        kept = (
            f"the checkpoint of step {newest_checkpoint_step} is the newest complete one"
            if newest_checkpoint_step is not None
            else "no checkpoint was completed"
        )
        super().__init__(
            ErrorKind.RESOURCE_EXHAUSTED,
            "DISK_FULL",
            f"the disk is full: writing {what} at step {step} under {folder} failed ({detail}); nothing half-written "
            f"was left and {kept}",
            step=step,
            hint=(
                f"Free at least {_mib(needed_bytes)} (about one checkpoint) on the disk of {folder} "
                f"({_mib(free_bytes)} free now): delete old jobs' checkpoints and artifacts under the data dir, or "
                f"keep fewer checkpoints (save_total_limit is {save_total_limit or 'unlimited'}) and save less often "
                "(a larger save_steps)."
            ),
        )


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28")


def disk_full_detail(exc: BaseException) -> str | None:
    """What says that a write failed for want of space, or None when it failed otherwise. Writers wrap the OSError:
    torch in an opaque RuntimeError (the OSError is its context), safetensors in an error that says so in words."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return current.strerror or str(current)
        text = str(current)
        if any(words in text for words in _DISK_FULL_WORDS):
            return text.splitlines()[0]
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def disk_full_as_error(
    step: int, what: str, output_dir: Path, config: TrainingConfig, *, trainable_parameters: int
) -> Iterator[None]:
    """A full disk (or quota) while writing becomes DISK_FULL, saying what to free; other errors pass through.

    The writers undo their staging folders first, so the newest complete checkpoint is still the one to resume from.
    """
    try:
        yield
    except Exception as exc:
        detail = disk_full_detail(exc)
        if detail is None:
            raise
        # checkpoint imports torch, which the server process never loads with this module.
        from finetune_server.training.engine.checkpoint import folder_size, list_checkpoints

        newest = list_checkpoints(output_dir)
        # One checkpoint's size: the last one written, else adapter + AdamW's two moments in fp32.
        needed = folder_size(newest[-1][1]) if newest else 12 * trainable_parameters
        try:
            free = shutil.disk_usage(output_dir).free
        except OSError:
            free = 0
        raise DiskFullError(
            step,
            what,
            str(output_dir),
            detail,
            needed_bytes=needed,
            free_bytes=free,
            newest_checkpoint_step=newest[-1][0] if newest else None,
            save_total_limit=int(config.save_total_limit or 0),
        ) from exc


def _mib(size: int) -> str:
    return f"{max(size, 0) / (1 << 20):.1f} MiB"


class NoUsableExamplesError(TrainingError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(
            ErrorKind.INVALID_ARGUMENT,
            "NO_USABLE_EXAMPLES",
            f"{field}: {message}",
            violations=[Violation(field, "NO_USABLE_EXAMPLES", message)],
            hint="Check the data format and that answers survive max_length (the prompt is masked from the loss).",
        )


class TrainingCancelled(Exception):  # noqa: N818 - a state, not an error
    """`should_stop()` returned True; training stopped between micro-steps and saved nothing extra."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled at step {step}")
        self.step = step
