"""Continuing a job against the session's real server: a second job starts from the first one's adapter (final or a
checkpoint, optionally with its optimizer state), its lineage shows, and bad references are refused by field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from finetune_client import (
    FinetuneServiceError,
    GrpcFineTuneService,
    ProgressUpdate,
    TrainResult,
    config_from_dict,
    from_rpc_error,
)
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb

from .conftest import RunningServer

BASE = {
    "model_name": "tiny-qwen2",
    "dataset": "facts.jsonl",
    "max_length": 128,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-2,  # enough for 8 steps to move the random model's loss well below where it starts
    "lora": {"r": 8},
}


@pytest.fixture(scope="module")
def service(server: RunningServer) -> Iterator[GrpcFineTuneService]:
    with GrpcFineTuneService(server.address, timeout=120) as client:
        yield client


def train(service: GrpcFineTuneService, **fields: Any) -> tuple[TrainResult, list[float]]:
    """Train to the end; the result and the loss of each step."""
    progress: list[ProgressUpdate] = []
    result = service.train({**BASE, **fields}, progress.append)
    assert result.success, result.error
    assert [p.step for p in progress] == list(range(1, len(progress) + 1))
    return result, [p.loss for p in progress]


@pytest.fixture(scope="module")
def source(service: GrpcFineTuneService) -> tuple[TrainResult, list[float]]:
    """The job to continue: 8 steps from a fresh adapter, checkpoints at steps 4 and 8."""
    return train(service, max_steps=8, save_steps=4)


@pytest.fixture(scope="module")
def continued(service: GrpcFineTuneService, source: tuple[TrainResult, list[float]]) -> tuple[TrainResult, list[float]]:
    """A job continuing the source's final adapter for 2 steps; no lora fields: it takes the source's shape (r=8),
    which the weights need."""
    return train(service, lora={}, init_from_job=source[0].job_id, max_steps=2, save_steps=0)


def test_a_continued_job_starts_from_the_final_adapter_and_shows_its_lineage(
    service: GrpcFineTuneService,
    source: tuple[TrainResult, list[float]],
    continued: tuple[TrainResult, list[float]],
) -> None:
    (first, fresh_losses), (job_result, losses) = source, continued
    learned = fresh_losses[0] - fresh_losses[-1]
    assert learned > 0.2, f"the source job must learn something to continue from: {fresh_losses}"
    # Same seed and data: step 1 trains on the batch the source's step 1 did, now with the trained adapter.
    assert abs(losses[0] - fresh_losses[-1]) < 0.3 * learned, (losses, fresh_losses)
    assert losses[0] < fresh_losses[0] - 0.7 * learned, "it started from the trained adapter, not a fresh one"

    job = service.get_job(job_result.job_id)
    assert job.config.lora.r == 8 and job.config.init_from_job == first.job_id
    assert job.lineage.source_job_id == first.job_id and not job.lineage.HasField("source_checkpoint_step")
    assert not job.lineage.optimizer_resumed
    listed = {j.id: j for j in service.list_jobs()}
    assert listed[job_result.job_id].lineage == job.lineage
    assert not listed[first.job_id].HasField("lineage"), "a fresh job has no lineage"
    logs = [e.log.message for e in service.watch(job_result.job_id) if e.WhichOneof("kind") == "log"]
    assert any(m.startswith("starting from the adapter") and m.endswith("/adapter") for m in logs), logs


def test_a_continued_job_starts_from_a_listed_checkpoint_with_its_optimizer_state(
    service: GrpcFineTuneService,
    source: tuple[TrainResult, list[float]],
    continued: tuple[TrainResult, list[float]],
) -> None:
    first, fresh_losses = source
    assert [c.step for c in service.list_checkpoints(first.job_id)] == [4, 8]
    from_checkpoint, losses = train(
        service, init_from_job=first.job_id, init_from_checkpoint=4, resume_optimizer=True, max_steps=2, save_steps=0
    )
    # On the first batch the step-4 adapter is below a fresh one and above the final one (4 more steps).
    from_final = continued[1][0]
    assert from_final < losses[0] < fresh_losses[0], (from_final, losses, fresh_losses)

    job = service.get_job(from_checkpoint.job_id)
    assert job.lineage.source_job_id == first.job_id and job.lineage.source_checkpoint_step == 4
    assert job.lineage.optimizer_resumed
    logs = [e.log.message for e in service.watch(from_checkpoint.job_id) if e.WhichOneof("kind") == "log"]
    assert any("step-00000004/adapter and its optimizer state" in m for m in logs), logs


def rejection(service: GrpcFineTuneService, method: str, **fields: Any) -> FinetuneServiceError:
    config = config_from_dict({**BASE, "max_steps": 1, **fields})
    request = pb.ValidateConfigRequest(config=config) if method == "ValidateConfig" else pb.TrainRequest(config=config)
    call = getattr(service._stub, method)
    with pytest.raises(grpc.RpcError) as caught:
        list(call(request, timeout=60)) if method == "Train" else call(request, timeout=60)
    return from_rpc_error(caught.value)


@pytest.mark.parametrize("method", ["ValidateConfig", "Train"])
def test_bad_references_are_refused_with_their_field(
    service: GrpcFineTuneService, source: tuple[TrainResult, list[float]], method: str
) -> None:
    first, _ = source
    unknown = rejection(service, method, init_from_job="job-does-not-exist")
    assert unknown.code == grpc.StatusCode.NOT_FOUND
    assert [(v.field, v.reason) for v in unknown.violations] == [("init_from_job", "JOB_NOT_FOUND")]
    assert [(r.resource_type, r.resource_name) for r in unknown.resources] == [
        ("finetune.sage/Job", "job-does-not-exist")
    ]

    step = rejection(service, method, init_from_job=first.job_id, init_from_checkpoint=3)
    assert step.code == grpc.StatusCode.NOT_FOUND
    assert [(v.field, v.reason) for v in step.violations] == [("init_from_checkpoint", "CHECKPOINT_NOT_FOUND")]
    assert "its checkpoints: 4, 8" in step.violations[0].message

    shape = rejection(service, method, init_from_job=first.job_id, lora={"r": 4})
    assert shape.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [(v.field, v.reason) for v in shape.violations] == [("lora.r", "INIT_ADAPTER_MISMATCH")]
    assert "has r=8, got 4" in shape.violations[0].message

    orphan = rejection(service, method, init_from_checkpoint=4, resume_optimizer=True)
    assert orphan.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {(v.field, v.reason) for v in orphan.violations} == {
        ("init_from_checkpoint", "NEEDS_JOB"),
        ("resume_optimizer", "NEEDS_JOB"),
    }


def test_a_job_without_an_adapter_yet_is_a_failed_precondition(service: GrpcFineTuneService) -> None:
    stream = service.iter_train({**BASE, "max_steps": 10_000, "save_steps": 0})
    unfinished = next(stream).job
    try:
        problem = rejection(service, "ValidateConfig", init_from_job=unfinished.id)
        assert problem.code == grpc.StatusCode.FAILED_PRECONDITION
        assert [(v.field, v.reason) for v in problem.violations] == [("init_from_job", "NO_ADAPTER")]
        assert "no final adapter yet" in problem.violations[0].message
    finally:
        service.cancel_job(unfinished.id)
        for _ in stream:  # to its end: the next test's jobs get the slot
            pass


def test_a_job_that_another_one_continues_from_cannot_be_deleted_until_that_one_ends(
    service: GrpcFineTuneService, source: tuple[TrainResult, list[float]]
) -> None:
    source_id = source[0].job_id
    stream = service.iter_train({**BASE, "lora": {}, "init_from_job": source_id, "max_steps": 10_000})
    continuing = next(stream).job
    try:
        with pytest.raises(FinetuneServiceError) as refused:
            service.delete_job(source_id)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION and refused.value.reason == "JOB_IN_USE"
        assert continuing.id in refused.value.message
        assert service.get_job(source_id).state == pb.JOB_STATE_SUCCEEDED, "a refused delete removes nothing"
    finally:
        service.cancel_job(continuing.id)
        for _ in stream:
            pass
