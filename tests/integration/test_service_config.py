"""The published service config against a real server whose first call of each method fails UNAVAILABLE
(FINETUNE_FAULTS=unavailable_first_calls=1, refused before the servicer sees the call, through the one error mapping).

gRPC itself retries the methods the config names, so a channel built with `channel_options()` (and the typed client,
which builds its channel so) never sees that first failure; Train has no policy, so its first call fails for everyone.
Each test spends the first call of different methods, so they hold in any order.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from finetune_client import (
    FinetuneServiceError,
    GrpcFineTuneService,
    ServerUnavailableError,
    channel_options,
    from_rpc_error,
)
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc

from .conftest import RunningServer


def bad_config(model: Path) -> dict[str, object]:
    """Refused by validation (INVALID_ARGUMENT): a Train that gets through creates no job."""
    return {"model_name": model.name, "dataset": "facts.jsonl", "lora": {"r": 0}}


def test_a_channel_with_the_published_config_retries_reads_only(flaky_server: RunningServer) -> None:
    with grpc.insecure_channel(flaky_server.address, options=channel_options(initial_backoff=0.05)) as channel:
        stub = pb_grpc.FineTuneServiceStub(channel)
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)  # its first attempt was refused
        assert info.version
        with pytest.raises(grpc.RpcError) as first:
            stub.CancelJob(pb.CancelJobRequest(job_id="job-nope"), timeout=10)
        assert first.value.code() == grpc.StatusCode.UNAVAILABLE, "CancelJob has no retry policy"
        with pytest.raises(grpc.RpcError) as second:
            stub.CancelJob(pb.CancelJobRequest(job_id="job-nope"), timeout=10)
        assert second.value.code() == grpc.StatusCode.NOT_FOUND, "the server itself was fine"


def test_the_typed_client_retries_through_the_config_and_never_train_without_request_id(
    flaky_server: RunningServer, tiny_model_dir: Path
) -> None:
    with GrpcFineTuneService(flaky_server.address, timeout=10, initial_backoff=0.05) as client:
        assert client.list_presets().presets
        assert list(client.list_jobs()) == []
        assert client.validate_config(bad_config(tiny_model_dir)).valid is False  # a report, not UNAVAILABLE
        with pytest.raises(ServerUnavailableError) as refused:
            list(client.iter_train(bad_config(tiny_model_dir), request_id=""))
        assert refused.value.reason == "INJECTED_UNAVAILABLE", "Train has no retry policy"
        with pytest.raises(FinetuneServiceError) as rejected:
            list(client.iter_train(bad_config(tiny_model_dir), request_id=""))
        assert rejected.value.code == grpc.StatusCode.INVALID_ARGUMENT, "the server itself was fine"


def test_unavailable_carries_retry_info(flaky_server: RunningServer) -> None:
    """Without a retry policy the caller sees the refusal, and RetryInfo says how long to wait."""
    channel, stub = flaky_server.stub()
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.GetJob(pb.GetJobRequest(job_id="job-nope"), timeout=10)
    refused = from_rpc_error(caught.value)
    assert (refused.code, refused.reason) == (grpc.StatusCode.UNAVAILABLE, "INJECTED_UNAVAILABLE")
    assert refused.retry_delay == 1.0
