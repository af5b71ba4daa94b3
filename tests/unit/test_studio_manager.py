"""FinetuneManager driven by a small in-process IFineTuneService (no grpc involved)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from os import PathLike
from typing import Any

import pytest

from finetune_client import (
    ExportResult,
    FinetuneManager,
    IFineTuneService,
    ProgressCallback,
    ProgressUpdate,
    TaskNotFoundError,
    TaskStateError,
    TaskStatus,
    TrainResult,
    ValidationResult,
)

WAIT = 10.0  # generous upper bound for a background thread to finish; tests never sleep


class ScriptedTrainer(IFineTuneService):
    """Reports `steps` progress updates, then holds until `release` is set (or a cancel arrives)."""

    def __init__(self, steps: int = 3, *, hold: bool = False, fail_with: str | None = None) -> None:
        self.steps = steps
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.reported = threading.Event()  # set once every progress update was sent
        self.before_progress = threading.Event()
        self.before_progress.set()
        self.fail_with = fail_with
        self.cancelled: list[str] = []
        self.exports: list[dict[str, Any]] = []
        self.trained: list[Mapping[str, Any]] = []
        self._count = 0
        self._lock = threading.Lock()

    def train(self, config: Mapping[str, Any], progress_callback: ProgressCallback | None = None) -> TrainResult:
        with self._lock:
            self._count += 1
            job_id = f"job-{self._count}"
        self.trained.append(config)
        self.before_progress.wait(WAIT)
        for step in range(1, self.steps + 1):
            if progress_callback is not None:
                progress_callback(ProgressUpdate(step=step, total_steps=self.steps, loss=1.0 / step, job_id=job_id))
        self.reported.set()
        self.release.wait(WAIT)
        if job_id in self.cancelled:
            return TrainResult(success=False, job_id=job_id, state="cancelled", error="the job was cancelled")
        if self.fail_with is not None:
            return TrainResult(success=False, job_id=job_id, state="failed", error=self.fail_with)
        return TrainResult(success=True, job_id=job_id, state="succeeded", final_loss=0.25, steps=self.steps)

    def cancel_job(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        self.release.set()

    def export_model(
        self,
        output_path: str | PathLike[str],
        *,
        format: str = "adapter",  # noqa: A002
        job_id: str | None = None,
        overwrite: bool = False,
    ) -> ExportResult:
        self.exports.append({"output_path": str(output_path), "format": format, "job_id": job_id})
        return ExportResult(success=True, output_path=str(output_path), format=format)

    def validate_config(self, config: Mapping[str, Any]) -> ValidationResult:
        ok = bool(config.get("model_name"))
        return ValidationResult(valid=ok, errors=[] if ok else ["model_name: required"])


class NoCancelTrainer(ScriptedTrainer):
    """A trainer without cancel_job (hides the parent's)."""

    def __getattribute__(self, name: str) -> Any:
        if name == "cancel_job":
            raise AttributeError(name)
        return super().__getattribute__(name)


class RaisingTrainer(ScriptedTrainer):
    def train(self, config: Mapping[str, Any], progress_callback: ProgressCallback | None = None) -> TrainResult:
        raise ConnectionError("server went away")


CONFIG = {"model_name": "tiny", "dataset": "d.jsonl", "lora": {"r": 4}}


def test_task_runs_to_completion_with_progress() -> None:
    trainer = ScriptedTrainer(steps=3)
    manager = FinetuneManager(trainer)
    task_id = manager.create_task("first", CONFIG)
    pending = manager.get_task(task_id)
    assert pending.status == TaskStatus.PENDING and pending["status"] == "pending"
    manager.start_training(task_id)
    info = manager.wait(task_id, timeout=WAIT)
    assert info.status == TaskStatus.COMPLETED
    assert info.progress is not None and (info.progress.step, info.progress.total_steps) == (3, 3)
    assert info.result is not None and info.result.final_loss == 0.25
    assert info.job_id == "job-1"
    assert info.error is None
    assert info.started_at is not None and info.finished_at is not None
    assert dict(info)["name"] == "first"
    assert trainer.trained == [CONFIG]


def test_config_is_copied_at_creation() -> None:
    manager = FinetuneManager(ScriptedTrainer())
    config: dict[str, Any] = {"model_name": "tiny", "lora": {"r": 4}}
    task_id = manager.create_task("t", config)
    config["lora"]["r"] = 99
    assert manager.get_task(task_id).config["lora"]["r"] == 4


def test_running_status_is_visible_while_training() -> None:
    trainer = ScriptedTrainer(steps=2, hold=True)
    manager = FinetuneManager(trainer)
    task_id = manager.create_task("t", CONFIG)
    manager.start_training(task_id)
    assert trainer.reported.wait(WAIT)
    info = manager.get_task(task_id)
    assert info.status == TaskStatus.RUNNING and info.progress is not None and info.progress.step == 2
    with pytest.raises(TimeoutError):
        manager.wait(task_id, timeout=0.01)
    trainer.release.set()
    assert manager.wait(task_id, timeout=WAIT).status == TaskStatus.COMPLETED


def test_failed_job_marks_the_task_failed_with_the_error() -> None:
    manager = FinetuneManager(ScriptedTrainer(fail_with="OUT_OF_MEMORY: CUDA out of memory"))
    task_id = manager.create_task("t", CONFIG)
    manager.start_training(task_id)
    info = manager.wait(task_id, timeout=WAIT)
    assert info.status == TaskStatus.FAILED
    assert info.error == "OUT_OF_MEMORY: CUDA out of memory"


def test_trainer_exception_marks_the_task_failed() -> None:
    manager = FinetuneManager(RaisingTrainer())
    task_id = manager.create_task("t", CONFIG)
    manager.start_training(task_id)
    info = manager.wait(task_id, timeout=WAIT)
    assert info.status == TaskStatus.FAILED
    assert info.error == "server went away"
    assert info.result is None


def test_cancel_pending_task() -> None:
    trainer = ScriptedTrainer()
    manager = FinetuneManager(trainer)
    task_id = manager.create_task("t", CONFIG)
    assert manager.cancel_task(task_id).status == TaskStatus.CANCELLED
    assert manager.wait(task_id, timeout=0).status == TaskStatus.CANCELLED
    with pytest.raises(TaskStateError):
        manager.start_training(task_id)
    assert trainer.trained == []


def test_cancel_running_task_uses_the_trainers_cancel_job() -> None:
    trainer = ScriptedTrainer(hold=True)
    manager = FinetuneManager(trainer)
    task_id = manager.create_task("t", CONFIG)
    manager.start_training(task_id)
    assert trainer.reported.wait(WAIT)
    assert manager.cancel_task(task_id).cancel_requested
    info = manager.wait(task_id, timeout=WAIT)
    assert trainer.cancelled == ["job-1"]
    assert info.status == TaskStatus.CANCELLED


def test_cancel_before_the_job_id_is_known_is_sent_with_the_first_progress() -> None:
    trainer = ScriptedTrainer(hold=True)
    trainer.before_progress.clear()
    manager = FinetuneManager(trainer)
    task_id = manager.create_task("t", CONFIG)
    manager.start_training(task_id)
    manager.cancel_task(task_id)
    assert trainer.cancelled == []  # no job id yet: nothing to cancel
    trainer.before_progress.set()
    assert manager.wait(task_id, timeout=WAIT).status == TaskStatus.CANCELLED
    assert trainer.cancelled == ["job-1"]  # exactly once, although three progress updates followed


def test_cancel_running_task_without_cancel_support_raises() -> None:
    trainer = NoCancelTrainer(hold=True)
    manager = FinetuneManager(trainer)
    task_id = manager.create_task("t", CONFIG)
    manager.start_training(task_id)
    assert trainer.reported.wait(WAIT)
    with pytest.raises(TaskStateError):
        manager.cancel_task(task_id)
    trainer.release.set()
    assert manager.wait(task_id, timeout=WAIT).status == TaskStatus.COMPLETED


def test_cancel_finished_task_raises() -> None:
    manager = FinetuneManager(ScriptedTrainer())
    task_id = manager.create_task("t", CONFIG)
    manager.start_training(task_id)
    manager.wait(task_id, timeout=WAIT)
    with pytest.raises(TaskStateError):
        manager.cancel_task(task_id)


def test_export_uses_the_tasks_job() -> None:
    trainer = ScriptedTrainer()
    manager = FinetuneManager(trainer)
    first = manager.create_task("a", CONFIG)
    second = manager.create_task("b", CONFIG)
    for task_id in (first, second):
        manager.start_training(task_id)
        manager.wait(task_id, timeout=WAIT)
    result = manager.export(first, "/tmp/out-a", "merged")
    assert result.success
    assert trainer.exports == [{"output_path": "/tmp/out-a", "format": "merged", "job_id": "job-1"}]


def test_export_of_an_unfinished_task_raises() -> None:
    manager = FinetuneManager(ScriptedTrainer())
    task_id = manager.create_task("t", CONFIG)
    with pytest.raises(TaskStateError):
        manager.export(task_id, "/tmp/out")


def test_validate_delegates_to_the_trainer() -> None:
    manager = FinetuneManager(ScriptedTrainer())
    good = manager.create_task("good", CONFIG)
    bad = manager.create_task("bad", {"dataset": "d.jsonl"})
    assert manager.validate(good)["valid"] is True
    assert manager.validate(bad).errors == ["model_name: required"]


def test_unknown_task_and_double_start() -> None:
    manager = FinetuneManager(ScriptedTrainer(hold=True))
    with pytest.raises(TaskNotFoundError):
        manager.get_task("task-nope")
    task_id = manager.create_task("t", CONFIG)
    manager.start_training(task_id)
    with pytest.raises(TaskStateError):
        manager.start_training(task_id)
    manager.cancel_task(task_id)
    manager.wait(task_id, timeout=WAIT)


def test_list_tasks_in_creation_order_and_thread_safe_creation() -> None:
    manager = FinetuneManager(ScriptedTrainer())
    ids: list[str] = []
    lock = threading.Lock()

    def create(n: int) -> None:
        for i in range(25):
            task_id = manager.create_task(f"{n}-{i}", CONFIG)
            with lock:
                ids.append(task_id)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    listed = [info.task_id for info in manager.list_tasks()]
    assert len(set(ids)) == 100
    assert sorted(listed) == sorted(ids)
    later = [manager.create_task(name, CONFIG) for name in ("x", "y", "z")]
    assert [info.task_id for info in manager.list_tasks()][-3:] == later
