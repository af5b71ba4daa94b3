"""Idempotency keys as AIP-155 has them, against real servers: scoped to the owner, a retry returns what the first
call made, the same key with another request is ALREADY_EXISTS naming that; on Train, Export and UploadDataset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc

from .conftest import ALICE, BOB, RunningServer
from .test_jobs import job_config, stub, train_to_end  # noqa: F401 - the module's stub fixture
from .test_security import as_token


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR))
    return info


def upload_with_key(
    stub: pb_grpc.FineTuneServiceStub,  # noqa: F811
    data: bytes,
    request_id: str,
    filename: str,
) -> Any:
    def messages() -> Iterator[pb.UploadDatasetRequest]:
        metadata = pb.UploadDatasetMetadata(filename=filename, request_id=request_id)
        yield pb.UploadDatasetRequest(metadata=metadata)
        yield pb.UploadDatasetRequest(chunk=data)

    return stub.UploadDataset(messages(), timeout=30)


def test_a_request_id_with_another_config_is_already_exists_naming_the_job(
    stub: pb_grpc.FineTuneServiceStub,  # noqa: F811
    tiny_model_dir: Path,
) -> None:
    job, _ = train_to_end(stub, job_config(tiny_model_dir.name, max_steps=2), request_id="key-reused-1")
    again, _ = train_to_end(stub, job_config(tiny_model_dir.name, max_steps=2), request_id="key-reused-1")
    assert again.id == job.id, "a retry of the same request returns the same job"
    with pytest.raises(grpc.RpcError) as caught:
        next(
            stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=3), request_id="key-reused-1"))
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = error_info(caught.value)
    assert info.reason == "REQUEST_ID_REUSED" and info.metadata["job_id"] == job.id


def test_request_ids_belong_to_their_owner(
    auth_server: RunningServer,
    tiny_model_dir: Path,
) -> None:
    channel, auth_stub = auth_server.stub()
    with channel:
        request = pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=2), request_id="shared-key")

        def train_as(token: str) -> pb.Job:
            stream = auth_stub.Train(request, metadata=as_token(token), timeout=300)
            job = next(stream).job
            assert [m.event for m in stream][-1].state_change.current == pb.JOB_STATE_SUCCEEDED
            return job

        alices, bobs = train_as(ALICE), train_as(BOB)
        assert bobs.id != alices.id and bobs.owner == "bob", "another token's key is another key"
        assert train_as(BOB).id == bobs.id


def test_upload_request_id_repeats_its_dataset_or_is_already_exists(
    stub: pb_grpc.FineTuneServiceStub,  # noqa: F811
) -> None:
    data = b"".join(b'{"instruction": "Key %d?", "output": "Upload %d."}\n' % (i, i) for i in range(20))
    first = upload_with_key(stub, data, "upload-key-1", "keyed.jsonl")
    again = upload_with_key(stub, data, "upload-key-1", "keyed.jsonl")
    assert again.dataset.id == first.dataset.id
    other = data + b'{"instruction": "One more?", "output": "Yes."}\n'
    with pytest.raises(grpc.RpcError) as caught:
        upload_with_key(stub, other, "upload-key-1", "keyed.jsonl")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(caught.value).metadata["dataset_id"] == first.dataset.id
    assert upload_with_key(stub, other, "upload-key-2", "keyed.jsonl").dataset.id != first.dataset.id


def test_export_request_id_repeats_its_artifact_or_is_already_exists(
    stub: pb_grpc.FineTuneServiceStub,  # noqa: F811
    tiny_model_dir: Path,
) -> None:
    job, events = train_to_end(stub, job_config(tiny_model_dir.name, max_steps=4, save_steps=2))
    assert events[-1].state_change.current == pb.JOB_STATE_SUCCEEDED
    request = pb.ExportRequest(job_id=job.id, format=pb.EXPORT_FORMAT_ADAPTER, request_id="export-key-1")
    first = list(stub.Export(request, timeout=120))[-1].artifact
    assert list(stub.Export(request, timeout=120))[-1].artifact.id == first.id
    other = pb.ExportRequest(
        job_id=job.id, format=pb.EXPORT_FORMAT_ADAPTER, checkpoint_step=2, request_id="export-key-1"
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Export(other, timeout=120))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(caught.value).metadata["artifact_id"] == first.id
