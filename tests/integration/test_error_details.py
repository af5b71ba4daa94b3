"""The error details AIP-193 pairs with a code, from a real server: what a NOT_FOUND could not find (ResourceInfo),
as the caller named it. RetryInfo and QuotaFailure are checked where their limits are reached: test_security (a full
queue), test_jobs (an upload over the limit), test_service_config (UNAVAILABLE)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from finetune_client import FinetuneServiceError, MissingResource, from_rpc_error
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc

from .conftest import RunningServer


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.FineTuneServiceStub]:
    channel, stub = server.stub()
    yield stub
    channel.close()


def refusal(call: Callable[[], Any]) -> FinetuneServiceError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return from_rpc_error(caught.value)


def named(error: FinetuneServiceError) -> list[tuple[str, str]]:
    return [(r.resource_type, r.resource_name) for r in error.resources]


def test_a_missing_job_is_named_by_every_method_that_takes_one(stub: pb_grpc.FineTuneServiceStub) -> None:
    calls = {
        "GetJob": lambda: stub.GetJob(pb.GetJobRequest(job_id="job-nope"), timeout=10),
        "CancelJob": lambda: stub.CancelJob(pb.CancelJobRequest(job_id="job-nope"), timeout=10),
        "WatchJob": lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id="job-nope"), timeout=10)),
        "Export": lambda: list(
            stub.Export(pb.ExportRequest(job_id="job-nope", format=pb.EXPORT_FORMAT_ADAPTER), timeout=10)
        ),
    }
    for method, call in calls.items():
        error = refusal(call)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND"), method
        assert error.resources == [MissingResource("finetune.sage/Job", "job-nope", "no job has the id 'job-nope'")], (
            method
        )


def test_a_missing_artifact_is_named(stub: pb_grpc.FineTuneServiceStub) -> None:
    error = refusal(lambda: list(stub.DownloadArtifact(pb.DownloadArtifactRequest(artifact_id="art-nope"), timeout=10)))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert named(error) == [("finetune.sage/Artifact", "art-nope")]


def test_a_config_names_each_missing_dataset_in_validate_and_train(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path
) -> None:
    config = pb.TrainingConfig(model_name=tiny_model_dir.name, dataset="nope.jsonl", eval_dataset="ds-ffffffffffffffff")
    validated = refusal(lambda: stub.ValidateConfig(pb.ValidateConfigRequest(config=config), timeout=30))
    trained = refusal(lambda: next(stub.Train(pb.TrainRequest(config=config), timeout=30)))
    for error in (validated, trained):
        assert error.code == grpc.StatusCode.NOT_FOUND
        assert sorted(named(error)) == [
            ("finetune.sage/Dataset", "ds-ffffffffffffffff"),
            ("finetune.sage/Dataset", "nope.jsonl"),
        ]
        assert all(r.description for r in error.resources)


def test_a_missing_model_is_named(stub: pb_grpc.FineTuneServiceStub) -> None:
    config = pb.TrainingConfig(model_name="no-such-model", dataset="facts.jsonl")
    error = refusal(lambda: stub.ValidateConfig(pb.ValidateConfigRequest(config=config), timeout=30))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert named(error) == [("finetune.sage/Model", "no-such-model")]


def test_other_codes_name_no_resource(stub: pb_grpc.FineTuneServiceStub) -> None:
    error = refusal(lambda: stub.ListJobs(pb.ListJobsRequest(page_token="not-a-token"), timeout=10))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.resources, error.retry_delay, error.quota_violations) == ([], None, [])
