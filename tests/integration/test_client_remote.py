"""The light client against a real server: the dict-in, dict-out validate_config, and Studio's manager."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_client import FinetuneManager, FinetuneServiceError, GrpcFineTuneService

from .conftest import RunningServer, write_jsonl


@pytest.fixture(scope="module")
def service(server: RunningServer) -> Iterator[GrpcFineTuneService]:
    with GrpcFineTuneService(server.address, timeout=30) as client:
        yield client


def test_validate_config_with_a_config_dict(service: GrpcFineTuneService, tiny_model_dir: Path) -> None:
    result = service.validate_config(
        {"model_name": tiny_model_dir.name, "dataset": "facts.jsonl", "preset": "minimal", "lora": {"r": 8}}
    )
    assert result["valid"] is True and result["errors"] == []
    assert result.resolved_config["max_length"] == 512 and result.resolved_config["lora"]["r"] == 8
    assert result.memory_estimate is not None and result.memory_estimate["total_bytes"] > 0
    assert result.dataset is not None and result.dataset["num_valid"] == 24


def test_validate_config_with_progress_streams_and_gives_the_same_result(
    service: GrpcFineTuneService, server: RunningServer, tiny_model_dir: Path
) -> None:
    rows = [{"instruction": f"Q{i}?", "output": f"A{i}."} for i in range(2000)]
    write_jsonl(server.dataset_root / "client-progress.jsonl", rows)
    config = {"model_name": tiny_model_dir.name, "dataset": "client-progress.jsonl", "max_length": 128}
    seen: list[int] = []
    streamed = service.validate_config(config, on_progress=lambda p: seen.append(p.records_checked))
    assert seen and 0 < seen[-1] <= len(rows)
    assert streamed.to_dict() == service.validate_config(config).to_dict()
    assert streamed.dataset is not None and streamed.dataset["num_valid"] == len(rows)
    rejected = service.validate_config({**config, "dataset": "missing.jsonl"}, on_progress=seen.append)
    assert rejected["valid"] is False and any(v.field == "dataset" for v in rejected.violations)


def test_a_rejected_dict_comes_back_as_a_result_with_every_violation(
    service: GrpcFineTuneService, tiny_model_dir: Path
) -> None:
    result = service.validate_config(
        {"model_name": tiny_model_dir.name, "dataset": "facts.jsonl", "learning_rate": 0, "lora": {"r": 0}}
    )
    assert result["valid"] is False
    fields = {v.field for v in result.violations}
    assert {"learning_rate", "lora.r"} <= fields
    assert any(line.startswith("lora.r") for line in result["errors"])


def test_unknown_keys_are_named_before_anything_is_sent(service: GrpcFineTuneService) -> None:
    result = service.validate_config({"model_name": "m", "dataset": "d", "learning_rat": 1e-4})
    assert result["valid"] is False
    assert any("learning_rat" in e and "learning_rate" in e for e in result["errors"])


def test_server_info_and_presets_through_the_client(service: GrpcFineTuneService) -> None:
    assert any(d.name == "cpu" for d in service.server_info().devices)
    assert "rtx_3060" in {p.name for p in service.list_presets().presets}


def test_unreachable_server_is_a_clear_error() -> None:
    with GrpcFineTuneService("127.0.0.1:1", timeout=2, retries=1) as client, pytest.raises(FinetuneServiceError) as e:
        client.validate_config({"model_name": "m", "dataset": "d"})
    assert "127.0.0.1:1" in str(e.value)


def test_studio_manager_validates_through_the_injected_remote_service(
    service: GrpcFineTuneService, tiny_model_dir: Path
) -> None:
    manager = FinetuneManager(trainer=service)
    good = manager.create_task("facts", {"model_name": tiny_model_dir.name, "dataset": "facts.jsonl"})
    bad = manager.create_task("broken", {"model_name": tiny_model_dir.name, "dataset": "nope.jsonl"})
    assert manager.validate(good)["valid"] is True
    assert manager.validate(bad)["valid"] is False
