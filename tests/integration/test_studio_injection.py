"""One Studio test body, two injected backends: the remote service over gRPC and the in-process LoRATrainer.

This is the dependency injection Studio relies on: FinetuneManager holds an IFineTuneService and cannot tell
which. The body also asks the other backend about the same bad configs and requires the same answer, so the two
services cannot drift apart in what they accept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_client import (
    ConfigConversionError,
    FinetuneManager,
    GrpcFineTuneService,
    IFineTuneService,
    ProgressUpdate,
    TaskStatus,
)
from finetune_server.inprocess.trainer import LoRATrainer

from .conftest import RunningServer

Config = Callable[..., dict[str, Any]]
Backend = tuple[IFineTuneService, Config]
BACKENDS = ("remote", "in_process")


@pytest.fixture
def backends(server: RunningServer, tiny_model_dir: Path, tmp_path: Path) -> Iterator[dict[str, Backend]]:
    """Both services; the same config, naming the model and dataset as each one finds them."""

    def config_for(name: str) -> Config:
        def config(**overrides: Any) -> dict[str, Any]:
            names = (
                {"model_name": tiny_model_dir.name, "dataset": "facts.jsonl"}
                if name == "remote"
                else {"model_name": str(tiny_model_dir), "dataset": str(server.dataset_root / "facts.jsonl")}
            )
            return {**names, "max_steps": 4, "max_length": 128, "per_device_train_batch_size": 4, "save_steps": 2,
                    "lora": {"r": 8}, **overrides}  # fmt: skip

        return config

    with GrpcFineTuneService(server.address, timeout=60) as remote:
        yield {
            "remote": (remote, config_for("remote")),
            "in_process": (LoRATrainer(tmp_path / "work"), config_for("in_process")),
        }


@pytest.mark.parametrize("name", BACKENDS)
def test_studio_trains_through_any_injected_service(name: str, backends: dict[str, Backend], tmp_path: Path) -> None:
    service, config = backends[name]
    seen: list[ProgressUpdate] = []
    result = service.train(config(), seen.append)
    assert result["success"] is True and result["steps"] == 4 and result["job_id"]
    assert [u.step for u in seen] == [1, 2, 3, 4] and all(u.total_steps == 4 for u in seen)
    assert all(u.job_id == result.job_id and u.loss > 0 and u.elapsed_s > 0 for u in seen)

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

    _assert_same_rejections(service, config, *backends[_other(name)])
    _assert_merged_export(service.export_model(tmp_path / "merged", format="merged", job_id=result.job_id))


def _other(name: str) -> str:
    return next(other for other in BACKENDS if other != name)


def _assert_same_rejections(
    service: IFineTuneService, config: Config, other: IFineTuneService, other_config: Config
) -> None:
    """A dict the conversion refuses and a config validation refuses: both services report the same violations."""
    unconvertible: dict[str, Any] = {"learning_rat": 1e-3, "lora": {"r": "8", "alfa": 16}, "max_steps": True}
    report = service.validate_config(config(**unconvertible))
    assert report == other.validate_config(other_config(**unconvertible))
    assert not report.valid and [(v.field, v.reason) for v in report.violations] == [
        ("max_steps", "INVALID_TYPE"),
        ("lora.r", "INVALID_TYPE"),
        ("lora.alfa", "UNKNOWN_FIELD"),
        ("learning_rat", "UNKNOWN_FIELD"),
    ]
    with pytest.raises(ConfigConversionError) as refused:
        service.train(config(**unconvertible))
    assert refused.value.violations == report.violations

    invalid: dict[str, Any] = {"learning_rate": 0.0, "lora": {"r": 0}}
    report = service.validate_config(config(**invalid))
    other_report = other.validate_config(other_config(**invalid))
    assert (report.violations, report.errors) == (other_report.violations, other_report.errors)
    assert not report.valid and {"learning_rate", "lora.r"} <= {v.field for v in report.violations}


def _assert_merged_export(exported: Any) -> None:
    """A MERGED export loads with plain transformers, and every file matches its manifest's size and sha256."""
    from transformers import AutoModelForCausalLM

    folder = Path(exported.output_path)
    assert exported.success and exported.format == "merged" and exported.vllm["compatible"] is True
    names = {f["path"] for f in exported.files}
    assert names == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json"} <= names
    for entry in exported.files:
        data = (folder / entry["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size_bytes"], entry["sha256"])
    assert exported.total_size_bytes == sum(f["size_bytes"] for f in exported.files)
    model, loading = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert not any("lora" in key for key in model.state_dict())
