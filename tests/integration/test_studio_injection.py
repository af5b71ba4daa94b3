"""One Studio test body, two injected backends: the remote service over gRPC and the in-process LoRATrainer.

This is the dependency injection Studio relies on: FinetuneManager holds an IFineTuneService and cannot tell which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_client import FinetuneManager, GrpcFineTuneService, IFineTuneService, ProgressUpdate, TaskStatus
from finetune_server.inprocess.trainer import LoRATrainer

from .conftest import RunningServer

Backend = tuple[IFineTuneService, Callable[..., dict[str, Any]]]


@pytest.fixture(params=["remote", "in_process"])
def backend(
    request: pytest.FixtureRequest, server: RunningServer, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[Backend]:
    def config(**overrides: Any) -> dict[str, Any]:
        names = (
            {"model_name": tiny_model_dir.name, "dataset": "facts.jsonl"}
            if request.param == "remote"
            else {"model_name": str(tiny_model_dir), "dataset": str(server.dataset_root / "facts.jsonl")}
        )
        return {**names, "max_steps": 4, "max_length": 128, "per_device_train_batch_size": 4, "save_steps": 2,
                "lora": {"r": 8}, **overrides}  # fmt: skip

    if request.param == "remote":
        with GrpcFineTuneService(server.address, timeout=60) as service:
            yield service, config
    else:
        yield LoRATrainer(tmp_path / "work"), config


def test_studio_trains_through_any_injected_service(backend: Backend) -> None:
    service, config = backend
    seen: list[ProgressUpdate] = []
    result = service.train(config(), seen.append)
    assert result["success"] is True and result["steps"] == 4 and result["job_id"]
    assert [u.step for u in seen] == [1, 2, 3, 4] and all(u.total_steps == 4 for u in seen)

    manager = FinetuneManager(trainer=service)
    task = manager.create_task("facts", config())
    assert manager.validate(task)["valid"] is True
    manager.start_training(task)
    info = manager.wait(task, timeout=300)
    assert info.status is TaskStatus.COMPLETED and info.result is not None and info.result["steps"] == 4
    assert info.progress is not None and info.progress.step == 4
    assert [t.task_id for t in manager.list_tasks()] == [task]

    bad = manager.create_task("broken", config(learning_rate=0.0))
    assert manager.validate(bad)["valid"] is False
