"""A job's checkpoints as callers see them: the complete ones on disk, each with the evaluation its job reported at
that step, and the best of them by a metric (what Export's best_checkpoint_by picks)."""

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
from finetune_server.storage.records import EventKind
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
