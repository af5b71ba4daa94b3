"""A job's checkpoints as callers see them: the complete ones on disk, each with the evaluation its job reported at
that step, the best of them by a metric (what Export's best_checkpoint_by picks), and the adapter a caller names
by job and step (what Generate answers with and a continued job starts from)."""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_server.errors import ErrorKind, FinetuneError, Violation, field_error
from finetune_server.storage import layout
from finetune_server.storage.job_store import JobStore
from finetune_server.storage.records import EventKind, JobRecord, JobState
from finetune_server.util.paths import folder_bytes

_EVENT_PAGE = 1000
_METRIC_NAME = re.compile(r"[A-Za-z0-9_./-]{1,64}")
_LOWER_IS_BETTER = ("loss", "perplexity")  # a metric naming one of these is best when lowest; others when highest


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    size_bytes: int
    create_time: float
    eval: dict[str, Any] | None  # EvalResult fields, when an evaluation ran at this step


async def job_checkpoints(store: JobStore, job_id: str, job_dir: Path) -> list[CheckpointInfo]:
    """Oldest first. Evaluations come from the job's stored events (the last one at a step counts)."""
    evals: dict[int, dict[str, Any]] = {}
    after = 0
    while events := await asyncio.to_thread(store.events_after, job_id, after, _EVENT_PAGE):
        for event in events:
            if event.kind is EventKind.EVAL:
                evals[int(event.payload.get("step", 0))] = event.payload
        after = events[-1].sequence

    def on_disk() -> list[CheckpointInfo]:
        return [
            CheckpointInfo(step, folder_bytes(path), path.stat().st_mtime, evals.get(step))
            for step, path in layout.JobDir(job_dir).complete_checkpoints()
        ]

    return await asyncio.to_thread(on_disk)


def metric_of(evaluation: dict[str, Any], metric: str) -> float | None:
    """An evaluation's value of `metric` (a field of EvalResult or one of its `metrics`), when finite."""
    value = evaluation.get(metric, (evaluation.get("metrics") or {}).get(metric))
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def best_checkpoint(checkpoints: list[CheckpointInfo], metric: str, job_id: str) -> CheckpointInfo:
    """The checkpoint whose evaluation is best by `metric` (the newest of equals); INVALID_ARGUMENT for a name no
    metric can have, FAILED_PRECONDITION when no checkpoint was evaluated with it."""
    if not _METRIC_NAME.fullmatch(metric):
        raise field_error(
            ErrorKind.INVALID_ARGUMENT,
            "INVALID_METRIC_NAME",
            "best_checkpoint_by",
            "a metric name is 1 to 64 letters, digits, '_', '.', '-' or '/', e.g. eval_loss",
        )
    scored = [
        (value, c.step, c)
        for c in checkpoints
        if c.eval is not None and (value := metric_of(c.eval, metric)) is not None
    ]
    if not scored:
        message = f"job {job_id} has no checkpoint with an evaluation that reports {metric!r}"
        raise FinetuneError(
            ErrorKind.FAILED_PRECONDITION,
            "NO_EVALUATED_CHECKPOINT",
            message,
            violations=[Violation("best_checkpoint_by", "NO_EVALUATED_CHECKPOINT", message)],
            hint="Train with eval_steps equal to (or a multiple of) save_steps, so checkpoints are evaluated.",
        )
    lower = any(word in metric for word in _LOWER_IS_BETTER)
    return (min(scored, key=lambda s: (s[0], -s[1])) if lower else max(scored, key=lambda s: (s[0], s[1])))[2]


@dataclass(frozen=True)
class JobAdapter:
    """A job's adapter folder, and the checkpoint folder holding the optimizer state it was saved with (None when
    no checkpoint of that step is kept)."""

    adapter_dir: Path
    checkpoint_dir: Path | None


def job_adapter(job: JobRecord, job_dir: Path, step: int | None, *, job_field: str, step_field: str) -> JobAdapter:
    """The final adapter of `job` (step None), FAILED_PRECONDITION NO_ADAPTER on `job_field` until the job has
    succeeded with one; or its checkpoint at `step`, NOT_FOUND CHECKPOINT_NOT_FOUND on `step_field` listing the
    steps it has. Reads the disk: call it off the event loop."""
    folder = layout.JobDir(job_dir)
    checkpoints = dict(folder.complete_checkpoints())
    if step is None:
        if job.state is not JobState.SUCCEEDED or not layout.has_adapter(folder.adapter):
            listed = ", ".join(map(str, checkpoints)) or "none"
            message = f"job {job.id} is {job.state.value}: it has no final adapter yet (its checkpoints: {listed})"
            raise FinetuneError(
                ErrorKind.FAILED_PRECONDITION,
                "NO_ADAPTER",
                message,
                violations=[Violation(job_field, "NO_ADAPTER", message)],
                hint=f"Wait for the job to succeed, or name one of its checkpoints with {step_field}.",
            )
        final_step = (job.result or {}).get("steps")
        return JobAdapter(folder.adapter, checkpoints.get(final_step) if isinstance(final_step, int) else None)
    path = checkpoints.get(step)
    if path is None or not layout.has_adapter(path / layout.ADAPTER_DIR):
        listed = ", ".join(map(str, checkpoints)) or "none"
        error = field_error(
            ErrorKind.NOT_FOUND,
            "CHECKPOINT_NOT_FOUND",
            step_field,
            f"job {job.id} has no checkpoint at step {step}; its checkpoints: {listed}",
        )
        error.metadata.update(available_steps=",".join(map(str, checkpoints)))
        raise error
    return JobAdapter(path / layout.ADAPTER_DIR, path)
