"""FinetuneManager: Studio's task list over any IFineTuneService (the remote client or an in-process trainer).

A task is a named config that can be validated, trained in a background thread (progress recorded from the
trainer's callback), waited for, cancelled and exported. All methods are safe to call from several threads.
"""

from __future__ import annotations

import copy
import enum
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from finetune_client.interface import (
    ExportResult,
    IFineTuneService,
    ProgressUpdate,
    TrainResult,
    ValidationResult,
    _DictLike,
)

__all__ = ["FinetuneManager", "TaskInfo", "TaskNotFoundError", "TaskStateError", "TaskStatus"]

logger = logging.getLogger(__name__)


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_FINISHED = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


class TaskNotFoundError(KeyError):
    """No task has this id."""


class TaskStateError(RuntimeError):
    """The task is not in a state that allows the operation (e.g. cancelling a finished task)."""


@dataclass(frozen=True, eq=True)
class TaskInfo(_DictLike):
    """A snapshot of a task (also usable as a dict, as task records first were)."""

    task_id: str
    name: str
    status: TaskStatus
    config: dict[str, Any]
    progress: ProgressUpdate | None = None
    result: TrainResult | None = None
    error: str | None = None
    job_id: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False


@dataclass
class _Task:
    task_id: str
    name: str
    config: dict[str, Any]
    created_at: float
    status: TaskStatus = TaskStatus.PENDING
    progress: ProgressUpdate | None = None
    result: TrainResult | None = None
    error: str | None = None
    job_id: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    cancel_sent: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def snapshot(self) -> TaskInfo:
        return TaskInfo(
            task_id=self.task_id,
            name=self.name,
            status=self.status,
            config=copy.deepcopy(self.config),
            progress=self.progress,
            result=self.result,
            error=self.error,
            job_id=self.job_id,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            cancel_requested=self.cancel_requested,
        )


class FinetuneManager:
    """Studio's consumer of a fine-tuning backend, injected with any IFineTuneService."""

    def __init__(self, trainer: IFineTuneService) -> None:
        self._trainer = trainer
        self._lock = threading.Lock()
        self._tasks: dict[str, _Task] = {}

    def create_task(self, name: str, config: Mapping[str, Any]) -> str:
        """Record a pending task with a copy of `config`; returns its id."""
        task = _Task(
            task_id=f"task-{uuid.uuid4().hex[:12]}",
            name=name,
            config=copy.deepcopy(dict(config)),
            created_at=time.time(),
        )
        with self._lock:
            self._tasks[task.task_id] = task
        return task.task_id

    def start_training(self, task_id: str) -> None:
        """Train a pending task in a background thread; returns at once."""
        with self._lock:
            task = self._get(task_id)
            if task.status != TaskStatus.PENDING:
                raise TaskStateError(f"task {task_id} is {task.status}, only a pending task can start")
            task.status = TaskStatus.RUNNING
            task.started_at = time.time()
            config = copy.deepcopy(task.config)
        thread = threading.Thread(target=self._run, args=(task, config), name=f"finetune-{task_id}", daemon=True)
        thread.start()

    def get_task(self, task_id: str) -> TaskInfo:
        with self._lock:
            return self._get(task_id).snapshot()

    def list_tasks(self) -> list[TaskInfo]:
        """Every task, oldest first."""
        with self._lock:
            return [task.snapshot() for task in self._tasks.values()]

    def cancel_task(self, task_id: str) -> TaskInfo:
        """Cancel a pending task at once, or ask the trainer to cancel a running one (via its `cancel_job`).

        A running task ends as `cancelled` once the trainer reports it. Raises TaskStateError for a finished task,
        or for a running one when the trainer cannot cancel.
        """
        cancel = self._cancel_function()
        with self._lock:
            task = self._get(task_id)
            if task.status in _FINISHED:
                raise TaskStateError(f"task {task_id} already {task.status}")
            if task.status == TaskStatus.PENDING:
                task.status = TaskStatus.CANCELLED
                task.finished_at = time.time()
                task.done.set()
                return task.snapshot()
            if cancel is None:
                raise TaskStateError(f"{type(self._trainer).__name__} cannot cancel a running task")
            task.cancel_requested = True
            job_id = self._claim_cancel(task)
        if job_id is not None:
            cancel(job_id)
        # Without a job id yet, the cancel is sent by the progress callback as soon as the job id is known.
        return self.get_task(task_id)

    def wait(self, task_id: str, timeout: float | None = None) -> TaskInfo:
        """Block until the task is finished; raises TimeoutError after `timeout` seconds."""
        with self._lock:
            task = self._get(task_id)
        if not task.done.wait(timeout):
            raise TimeoutError(f"task {task_id} still {task.status} after {timeout}s")
        return self.get_task(task_id)

    def export(
        self,
        task_id: str,
        output_path: str | PathLike[str],
        format: str = "adapter",  # noqa: A002 - the keyword callers already pass
        *,
        overwrite: bool = False,
    ) -> ExportResult:
        """Export the model a completed task trained."""
        with self._lock:
            task = self._get(task_id)
            if task.status != TaskStatus.COMPLETED or task.result is None:
                raise TaskStateError(f"task {task_id} is {task.status}; only a completed task can be exported")
            job_id = task.result.job_id
        return self._trainer.export_model(output_path, format=format, job_id=job_id, overwrite=overwrite)

    def validate(self, task_id: str) -> ValidationResult:
        with self._lock:
            config = copy.deepcopy(self._get(task_id).config)
        return self._trainer.validate_config(config)

    # ----------------------------------------------------------------------------------------------------------

    def _get(self, task_id: str) -> _Task:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise TaskNotFoundError(task_id) from None

    def _cancel_function(self) -> Callable[[str], Any] | None:
        cancel = getattr(self._trainer, "cancel_job", None)
        return cancel if callable(cancel) else None

    @staticmethod
    def _claim_cancel(task: _Task) -> str | None:
        """The job id to cancel, once: the caller sends the cancel outside the lock. Call with the lock held."""
        if task.cancel_requested and not task.cancel_sent and task.job_id:
            task.cancel_sent = True
            return task.job_id
        return None

    def _run(self, task: _Task, config: dict[str, Any]) -> None:
        def on_progress(update: ProgressUpdate) -> None:
            with self._lock:
                task.progress = update
                if update.job_id and not task.job_id:
                    task.job_id = update.job_id
                job_id = self._claim_cancel(task)
            cancel = self._cancel_function()
            if job_id is not None and cancel is not None:
                try:
                    cancel(job_id)
                except Exception:
                    logger.exception("cancelling job %s of task %s failed", job_id, task.task_id)

        result: TrainResult | None = None
        error: str | None = None
        try:
            result = self._trainer.train(config, on_progress)
        except Exception as exc:  # the thread must record every failure, not die silently
            logger.exception("training task %s failed", task.task_id)
            error = str(exc) or type(exc).__name__
        with self._lock:
            task.result = result
            task.finished_at = time.time()
            if result is not None:
                task.job_id = result.job_id or task.job_id
                task.error = result.error
                if result.success:
                    task.status = TaskStatus.COMPLETED
                elif result.state == "cancelled":
                    task.status = TaskStatus.CANCELLED
                else:
                    task.status = TaskStatus.FAILED
            else:
                task.status = TaskStatus.FAILED
                task.error = error
            task.done.set()
