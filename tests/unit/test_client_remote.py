"""GrpcFineTuneService against a test double of the SERVER, started in-test on 127.0.0.1:0.

The double speaks the real contract over a real channel and can misbehave on demand (answer UNAVAILABLE, drop a
stream mid-way, send a wrong checksum), so the client's retry, reconnect and verification code runs for real.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from finetune_client import (
    ConfigConversionError,
    FinetuneServiceError,
    GrpcFineTuneService,
    ProgressUpdate,
    ServerUnavailableError,
)
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_client.remote import CHUNK_SIZE

PROGRESS_STEPS = 4
ARTIFACT_FILES = {
    "adapter_config.json": b'{"r": 8, "lora_alpha": 16}',
    "adapter_model.safetensors": bytes(range(256)) * 3,
    "tokenizer/chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
    "empty.txt": b"",
}
DOWNLOAD_CHUNK = 100


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _events(job_id: str, *, fail: bool = False) -> list[pb.JobEvent]:
    """QUEUED->RUNNING, progress steps 1..4, then a result and SUCCEEDED (or FAILED with an error)."""
    events: list[pb.JobEvent] = []

    def add(**kind: Any) -> None:
        events.append(pb.JobEvent(job_id=job_id, sequence=len(events) + 1, **kind))

    add(state_change=pb.StateChange(previous=pb.JOB_STATE_QUEUED, current=pb.JOB_STATE_RUNNING))
    for step in range(1, PROGRESS_STEPS + 1):
        progress = pb.TrainingProgress(step=step, total_steps=PROGRESS_STEPS, loss=2.0 / step, learning_rate=1e-4)
        progress.elapsed.FromSeconds(step)
        progress.memory.allocated_bytes = 1000 * step
        add(progress=progress)
    if fail:
        error = pb.JobError(reason="NAN_LOSS", message="the loss became NaN at step 4", hint="lower the learning rate")
        add(state_change=pb.StateChange(previous=pb.JOB_STATE_RUNNING, current=pb.JOB_STATE_FAILED, error=error))
    else:
        result = pb.JobResult(final_train_loss=0.5, steps=PROGRESS_STEPS, trained_tokens=4096, adapter_location="a")
        result.final_eval_loss = 0.75
        add(result=result)
        add(state_change=pb.StateChange(previous=pb.JOB_STATE_RUNNING, current=pb.JOB_STATE_SUCCEEDED))
    return events


def _final_job(job_id: str, events: list[pb.JobEvent]) -> pb.Job:
    job = pb.Job(id=job_id, state=events[-1].state_change.current, last_sequence=len(events))
    for event in events:
        if event.HasField("result"):
            job.result.CopyFrom(event.result)
        if event.HasField("state_change") and event.state_change.HasField("error"):
            job.error.CopyFrom(event.state_change.error)
    return job


def _rich_abort(context: grpc.ServicerContext, code: int, message: str, *details: Any) -> None:
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    context.abort_with_status(rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed)))


@dataclass
class FakeServer(pb_grpc.FineTuneServiceServicer):
    """The server double: scripted behaviour, and a record of what the client sent."""

    validate_failures: int = 0  # answer UNAVAILABLE this many times first
    train_failures_before_job: int = 0
    drop_train_after: int | None = None  # abort the Train stream with UNAVAILABLE after this many events
    watch_replays_everything: bool = False  # ignore after_sequence (a sloppy server): the client must dedupe
    fail_job: bool = False
    corrupt_path: str | None = None  # advertise a wrong sha256 for this artifact file
    drop_download_of: str | None = None  # abort the first download of this file after one chunk
    artifact_paths: dict[str, bytes] = field(default_factory=lambda: dict(ARTIFACT_FILES))
    block_get_job: threading.Event = field(default_factory=threading.Event)
    calls: list[str] = field(default_factory=list)
    train_requests: list[pb.TrainRequest] = field(default_factory=list)
    watch_requests: list[pb.WatchJobRequest] = field(default_factory=list)
    download_requests: list[pb.DownloadArtifactRequest] = field(default_factory=list)
    export_requests: list[pb.ExportRequest] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)
    uploaded: list[tuple[pb.UploadDatasetMetadata, list[bytes]]] = field(default_factory=list)
    jobs: dict[str, list[pb.JobEvent]] = field(default_factory=dict)

    def _record(self, name: str, context: grpc.ServicerContext) -> None:
        self.calls.append(name)
        self.authorization += [str(v) for k, v in context.invocation_metadata() if k == "authorization"]

    def ValidateConfig(self, request: pb.ValidateConfigRequest, context: grpc.ServicerContext) -> Any:
        self._record("ValidateConfig", context)
        if self.calls.count("ValidateConfig") <= self.validate_failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        report = pb.ValidateConfigResponse(valid=True)
        report.resolved_config.CopyFrom(request.config)
        if not report.resolved_config.HasField("max_length"):
            report.resolved_config.max_length = 2048
            report.preset_filled_fields.append("max_length")
        report.dataset.num_examples = 12
        report.memory_estimate.total_bytes = 2**33
        if request.config.lora.HasField("r") and request.config.lora.r < 1:
            report.valid = False
            report.violations.add(field="lora.r", reason="OUT_OF_RANGE", message="must be >= 1")
            report.violations.add(field="dataset", reason="BAD_LINE", message="missing 'output'", line=3)
            bad = error_details_pb2.BadRequest()
            bad.field_violations.add(field="lora.r", description="must be >= 1", reason="OUT_OF_RANGE")
            bad.field_violations.add(field="dataset", description="line 3: missing 'output'", reason="BAD_LINE")
            info = error_details_pb2.ErrorInfo(reason="INVALID_CONFIG", domain="finetune.sage")
            _rich_abort(context, code_pb2.INVALID_ARGUMENT, "the config has 2 problems", info, bad, report)
        return report

    def Train(self, request: pb.TrainRequest, context: grpc.ServicerContext) -> Iterator[pb.TrainResponse]:
        self._record("Train", context)
        self.train_requests.append(request)
        if self.calls.count("Train") <= self.train_failures_before_job:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        if request.config.lora.HasField("r") and request.config.lora.r < 1:
            info = error_details_pb2.ErrorInfo(reason="INVALID_CONFIG", domain="finetune.sage")
            bad = error_details_pb2.BadRequest()
            bad.field_violations.add(field="lora.r", description="must be >= 1", reason="OUT_OF_RANGE")
            _rich_abort(context, code_pb2.INVALID_ARGUMENT, "the config has 1 problem", info, bad)
        job_id = f"job-{len(self.jobs) + 1}"
        self.jobs[job_id] = _events(job_id, fail=self.fail_job)
        yield pb.TrainResponse(job=pb.Job(id=job_id, state=pb.JOB_STATE_QUEUED, request_id=request.request_id))
        for index, event in enumerate(self.jobs[job_id]):
            if self.drop_train_after is not None and index == self.drop_train_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "server going away")
            yield pb.TrainResponse(event=event)

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchJobResponse]:
        self._record("WatchJob", context)
        self.watch_requests.append(request)
        after = 0 if self.watch_replays_everything else request.after_sequence
        for event in self.jobs[request.job_id]:
            if event.sequence > after:
                yield pb.WatchJobResponse(event=event)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.GetJobResponse:
        self._record("GetJob", context)
        if request.job_id == "job-slow":
            self.block_get_job.wait(30)
        if request.job_id not in self.jobs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id} not found")
        return pb.GetJobResponse(job=_final_job(request.job_id, self.jobs[request.job_id]))

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        self._record("ListJobs", context)
        jobs = [pb.Job(id=f"job-{i}", state=pb.JOB_STATE_SUCCEEDED) for i in range(5)]
        start = int(request.page_token or 0)
        end = start + request.page_size
        token = str(end) if end < len(jobs) else ""
        return pb.ListJobsResponse(jobs=jobs[start:end], next_page_token=token)

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.CancelJobResponse:
        self._record("CancelJob", context)
        return pb.CancelJobResponse(job=pb.Job(id=request.job_id, state=pb.JOB_STATE_CANCELLED))

    def Export(self, request: pb.ExportRequest, context: grpc.ServicerContext) -> Iterator[pb.ExportResponse]:
        self._record("Export", context)
        self.export_requests.append(request)
        yield pb.ExportResponse(progress=pb.ExportProgress(stage="saving", fraction=0.5))
        artifact = pb.Artifact(id="art-1", job_id=request.job_id, format=request.format, base_model="tiny")
        for path, data in self.artifact_paths.items():
            sha = _sha(b"tampered") if path == self.corrupt_path else _sha(data)
            artifact.files.add(path=path, size_bytes=len(data), sha256=sha)
        artifact.total_size_bytes = sum(len(d) for d in self.artifact_paths.values())
        artifact.vllm.compatible = True
        artifact.vllm.serve_command = "vllm serve tiny --enable-lora"
        yield pb.ExportResponse(artifact=artifact)

    def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadArtifactResponse]:
        self._record("DownloadArtifact", context)
        self.download_requests.append(request)
        data = self.artifact_paths[request.path]
        first_try = sum(1 for r in self.download_requests if r.path == request.path) == 1
        for offset in range(request.offset, len(data), DOWNLOAD_CHUNK):
            if self.drop_download_of == request.path and first_try and offset > request.offset:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            yield pb.DownloadArtifactResponse(
                path=request.path,
                offset=offset,
                data=data[offset : offset + DOWNLOAD_CHUNK],
                file_size=len(data),
                sha256=_sha(data),
            )

    def UploadDataset(self, request_iterator: Iterator[pb.UploadDatasetRequest], context: grpc.ServicerContext) -> Any:
        self._record("UploadDataset", context)
        requests = list(request_iterator)
        metadata = requests[0].metadata
        chunks = [r.chunk for r in requests[1:]]
        self.uploaded.append((metadata, chunks))
        content = b"".join(chunks)
        if _sha(content) != metadata.sha256:
            context.abort(grpc.StatusCode.DATA_LOSS, "checksum mismatch")
        dataset = pb.Dataset(
            id=f"ds-{_sha(content)[:16]}", filename=metadata.filename, size_bytes=len(content), sha256=_sha(content)
        )
        return pb.UploadDatasetResponse(dataset=dataset)


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


@pytest.fixture
def address(fake: FakeServer) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_FineTuneServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    fake.block_get_job.set()
    server.stop(None)


@pytest.fixture
def client(address: str) -> Iterator[GrpcFineTuneService]:
    with GrpcFineTuneService(address, token="s3cret", retries=3, initial_backoff=0.01, max_backoff=0.05) as service:
        yield service


CONFIG = {"model_name": "tiny", "dataset": "train.jsonl", "lora": {"r": 8}}
BAD_CONFIG = {"model_name": "tiny", "dataset": "train.jsonl", "lora": {"r": 0}}


# ---------------------------------------------------------------------------------------------------------------
# ValidateConfig
# ---------------------------------------------------------------------------------------------------------------


def test_validate_valid_config_returns_the_report(client: GrpcFineTuneService, fake: FakeServer) -> None:
    result = client.validate_config(CONFIG)
    assert result.valid is True and result["valid"] is True
    assert result.errors == []
    assert result.resolved_config == {**CONFIG, "max_length": 2048}
    assert result.preset_filled_fields == ["max_length"]
    assert result.dataset is not None and result.dataset["num_examples"] == 12
    assert result.memory_estimate is not None and result.memory_estimate["total_bytes"] == 2**33
    assert fake.authorization == ["Bearer s3cret"]


def test_validate_rejected_config_is_a_result_not_an_exception(client: GrpcFineTuneService) -> None:
    result = client.validate_config(BAD_CONFIG)
    assert result.valid is False
    assert result.errors == ["lora.r: must be >= 1", "dataset: line 3: missing 'output'"]
    assert [v.line for v in result.violations] == [0, 3]
    assert result.get("resolved_config") == BAD_CONFIG | {"max_length": 2048}


def test_validate_unconvertible_dict_reports_without_calling(client: GrpcFineTuneService, fake: FakeServer) -> None:
    result = client.validate_config({"model_name": "tiny", "max_length": "long"})
    assert result.valid is False
    assert result.errors == ["max_length: expected an integer, got str 'long'"]
    assert fake.calls == []


def test_validate_is_retried_on_unavailable(client: GrpcFineTuneService, fake: FakeServer) -> None:
    fake.validate_failures = 2
    assert client.validate_config(CONFIG).valid
    assert fake.calls == ["ValidateConfig"] * 3


def test_retries_give_up_with_an_error_naming_the_address(address: str, fake: FakeServer) -> None:
    fake.validate_failures = 10
    with (
        GrpcFineTuneService(address, retries=1, initial_backoff=0.01) as service,
        pytest.raises(ServerUnavailableError) as info,
    ):
        service.validate_config(CONFIG)
    assert fake.calls == ["ValidateConfig"] * 2
    assert info.value.address == address and address in str(info.value)


def test_unreachable_server_raises_server_unavailable() -> None:
    service = GrpcFineTuneService("127.0.0.1:1", retries=0, timeout=5)
    with service, pytest.raises(ServerUnavailableError) as info:
        service.server_info()
    assert "127.0.0.1:1" in str(info.value)


def test_unary_deadline(address: str) -> None:
    with GrpcFineTuneService(address, timeout=0.2, retries=0) as service, pytest.raises(FinetuneServiceError) as info:
        service.get_job("job-slow")
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


# ---------------------------------------------------------------------------------------------------------------
# Train / WatchJob
# ---------------------------------------------------------------------------------------------------------------


def test_train_reports_progress_and_result(client: GrpcFineTuneService, fake: FakeServer) -> None:
    updates: list[ProgressUpdate] = []
    result = client.train(CONFIG, updates.append)
    assert result.success and result.state == "succeeded"
    assert (result.job_id, result.final_loss, result.eval_loss, result.steps) == ("job-1", 0.5, 0.75, 4)
    assert result.metrics["trained_tokens"] == 4096
    assert [u.step for u in updates] == [1, 2, 3, 4]
    assert updates[1].elapsed_s == 2.0 and updates[1].memory_bytes == 2000 and updates[1].job_id == "job-1"
    assert fake.calls == ["Train"]
    assert client.last_job_id == "job-1"


def test_train_sends_a_fresh_request_id_each_call(client: GrpcFineTuneService, fake: FakeServer) -> None:
    client.train(CONFIG)
    client.train(CONFIG)
    ids = [r.request_id for r in fake.train_requests]
    assert all(ids) and ids[0] != ids[1]


def test_train_reconnects_through_watch_job_and_delivers_each_event_once(
    client: GrpcFineTuneService, fake: FakeServer
) -> None:
    fake.drop_train_after = 3  # the state change and progress 1, 2 arrive, then the stream dies
    updates: list[ProgressUpdate] = []
    result = client.train(CONFIG, updates.append)
    assert [u.step for u in updates] == [1, 2, 3, 4]
    assert result.success and result.final_loss == 0.5
    assert fake.calls == ["Train", "WatchJob"]
    assert [(r.job_id, r.after_sequence) for r in fake.watch_requests] == [("job-1", 3)]


def test_events_are_never_delivered_twice_even_when_the_server_replays(
    client: GrpcFineTuneService, fake: FakeServer
) -> None:
    fake.drop_train_after = 4
    fake.watch_replays_everything = True
    responses = list(client.iter_train(CONFIG))
    assert responses[0].WhichOneof("kind") == "job"
    sequences = [r.event.sequence for r in responses[1:]]
    assert sequences == list(range(1, len(fake.jobs["job-1"]) + 1))


def test_watch_resumes_after_a_given_sequence(client: GrpcFineTuneService, fake: FakeServer) -> None:
    client.train(CONFIG)
    events = list(client.watch("job-1", after_sequence=5))
    assert [e.sequence for e in events] == [6, 7]
    assert events[-1].state_change.current == pb.JOB_STATE_SUCCEEDED


def test_failed_job_is_a_result_with_the_error_text(client: GrpcFineTuneService, fake: FakeServer) -> None:
    fake.fail_job = True
    result = client.train(CONFIG)
    assert result.success is False and result.state == "failed"
    assert result.error == "NAN_LOSS: the loss became NaN at step 4 (hint: lower the learning rate)"
    assert result.steps == 4


def test_train_is_retried_before_the_job_when_it_has_a_request_id(
    client: GrpcFineTuneService, fake: FakeServer
) -> None:
    fake.train_failures_before_job = 2
    assert client.train(CONFIG).success
    assert fake.calls == ["Train"] * 3
    assert len({r.request_id for r in fake.train_requests}) == 1  # the same key: the server returns the same job


def test_train_without_request_id_is_not_retried(client: GrpcFineTuneService, fake: FakeServer) -> None:
    fake.train_failures_before_job = 1
    with pytest.raises(ServerUnavailableError):
        list(client.iter_train(CONFIG, request_id=""))
    assert fake.calls == ["Train"]


def test_train_rejected_config_raises_with_violations(client: GrpcFineTuneService) -> None:
    with pytest.raises(FinetuneServiceError) as info:
        client.train(BAD_CONFIG)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.reason == "INVALID_CONFIG"
    assert [str(v) for v in info.value.violations] == ["lora.r: must be >= 1"]


def test_train_unconvertible_dict_raises_before_calling(client: GrpcFineTuneService, fake: FakeServer) -> None:
    with pytest.raises(ConfigConversionError):
        client.train({"model_name": "tiny", "lora_r": 8})
    with pytest.raises(ConfigConversionError):
        client.iter_train({"model_name": 3})  # eagerly, before any iteration
    with pytest.raises(ConfigConversionError):
        client.list_jobs(states=["sleeping"])
    assert fake.calls == []


def test_a_failing_progress_callback_does_not_stop_the_watch(client: GrpcFineTuneService) -> None:
    def explode(update: ProgressUpdate) -> None:
        raise RuntimeError("UI bug")

    assert client.train(CONFIG, explode).success


# ---------------------------------------------------------------------------------------------------------------
# Jobs, presets, server info, uploads
# ---------------------------------------------------------------------------------------------------------------


def test_list_jobs_iterates_every_page(client: GrpcFineTuneService, fake: FakeServer) -> None:
    jobs = list(client.list_jobs(states=["succeeded"], page_size=2))
    assert [j.id for j in jobs] == [f"job-{i}" for i in range(5)]
    assert fake.calls == ["ListJobs"] * 3


def test_get_and_cancel_job(client: GrpcFineTuneService) -> None:
    client.train(CONFIG)
    assert client.get_job("job-1").state == pb.JOB_STATE_SUCCEEDED
    assert client.cancel_job("job-1").state == pb.JOB_STATE_CANCELLED
    with pytest.raises(FinetuneServiceError) as info:
        client.get_job("job-404")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_unimplemented_methods_surface_as_service_errors(client: GrpcFineTuneService) -> None:
    with pytest.raises(FinetuneServiceError) as info:
        client.list_presets()
    assert info.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_upload_dataset_streams_chunks_with_checksum(
    client: GrpcFineTuneService, fake: FakeServer, tmp_path: Path
) -> None:
    content = b'{"text": "hello"}\n' * (CHUNK_SIZE // 8)  # 2.25 MiB
    source = tmp_path / "train.jsonl"
    source.write_bytes(content)
    result = client.upload_dataset(source, data_format="text")
    metadata, chunks = fake.uploaded[0]
    assert (metadata.filename, metadata.data_format, metadata.sha256) == ("train.jsonl", "text", _sha(content))
    assert [len(c) for c in chunks] == [CHUNK_SIZE, CHUNK_SIZE, len(content) - 2 * CHUNK_SIZE]
    assert result["id"] == f"ds-{_sha(content)[:16]}"
    assert result["size_bytes"] == len(content) and result["already_existed"] is False


def test_injected_channel_stays_open_after_close(address: str) -> None:
    channel = grpc.insecure_channel(address)
    GrpcFineTuneService(channel).close()
    assert GrpcFineTuneService(channel, retries=0).validate_config(CONFIG).valid
    channel.close()


# ---------------------------------------------------------------------------------------------------------------
# Export and download
# ---------------------------------------------------------------------------------------------------------------


def _leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


def test_export_downloads_and_verifies_every_file(
    client: GrpcFineTuneService, fake: FakeServer, tmp_path: Path
) -> None:
    client.train(CONFIG)
    output = tmp_path / "exports" / "adapter"
    result = client.export_model(output)
    for path, data in ARTIFACT_FILES.items():
        assert (output / path).read_bytes() == data
    assert result.success and result.output_path == str(output) and result.format == "adapter"
    assert result.artifact_id == "art-1" and result.vllm["compatible"] is True
    assert [f["path"] for f in result.files] == list(ARTIFACT_FILES)
    assert result.total_size_bytes == sum(len(d) for d in ARTIFACT_FILES.values())
    assert fake.export_requests[0].job_id == "job-1"  # the last trained job by default
    assert fake.export_requests[0].format == pb.EXPORT_FORMAT_ADAPTER
    assert _leftovers(output.parent, "adapter") == []


def test_export_with_a_bad_checksum_leaves_nothing(
    client: GrpcFineTuneService, fake: FakeServer, tmp_path: Path
) -> None:
    fake.corrupt_path = "adapter_model.safetensors"
    output = tmp_path / "adapter"
    with pytest.raises(FinetuneServiceError) as info:
        client.export_model(output, job_id="job-7", format="merged")
    assert info.value.code == grpc.StatusCode.DATA_LOSS
    assert info.value.reason == "CHECKSUM_MISMATCH"
    assert "adapter_model.safetensors" in info.value.message
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []
    assert fake.export_requests[0].format == pb.EXPORT_FORMAT_MERGED


def test_dropped_download_resumes_from_its_offset(
    client: GrpcFineTuneService, fake: FakeServer, tmp_path: Path
) -> None:
    fake.drop_download_of = "adapter_model.safetensors"
    output = tmp_path / "adapter"
    client.export_model(output, job_id="job-1")
    assert (output / "adapter_model.safetensors").read_bytes() == ARTIFACT_FILES["adapter_model.safetensors"]
    offsets = [r.offset for r in fake.download_requests if r.path == "adapter_model.safetensors"]
    assert offsets == [0, DOWNLOAD_CHUNK]


def test_export_refuses_a_non_empty_folder_unless_overwrite(
    client: GrpcFineTuneService, fake: FakeServer, tmp_path: Path
) -> None:
    output = tmp_path / "adapter"
    output.mkdir()
    (output / "old.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        client.export_model(output, job_id="job-1")
    assert fake.calls == []
    client.export_model(output, job_id="job-1", overwrite=True)
    assert not (output / "old.bin").exists()
    assert (output / "adapter_config.json").read_bytes() == ARTIFACT_FILES["adapter_config.json"]
    assert _leftovers(tmp_path, "adapter") == []


def test_export_into_an_existing_empty_folder(client: GrpcFineTuneService, tmp_path: Path) -> None:
    output = tmp_path / "adapter"
    output.mkdir()
    client.export_model(output, job_id="job-1")
    assert sorted(p.name for p in output.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "empty.txt",
        "tokenizer",
    ]


def test_export_refuses_paths_that_escape_the_output_folder(
    client: GrpcFineTuneService, fake: FakeServer, tmp_path: Path
) -> None:
    fake.artifact_paths = {"../escaped.txt": b"x"}
    output = tmp_path / "out" / "adapter"
    with pytest.raises(FinetuneServiceError) as info:
        client.export_model(output, job_id="job-1")
    assert info.value.reason == "UNSAFE_ARTIFACT_PATH"
    assert not (tmp_path / "out" / "escaped.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_export_without_any_job_is_a_value_error(client: GrpcFineTuneService, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no job to export"):
        client.export_model(tmp_path / "adapter")
