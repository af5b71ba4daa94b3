"""Jobs over gRPC against a real server with real workers: Train, WatchJob, GetJob, ListJobs, CancelJob, uploads."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from finetune_client import from_rpc_error
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.storage.layout import DataDir, TokenCacheDir

from .conftest import RunningServer, write_jsonl

FINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


@pytest.fixture(scope="module")
def stub(jobs_server: RunningServer) -> Iterator[pb_grpc.FineTuneServiceStub]:
    channel, stub = jobs_server.stub()
    yield stub
    channel.close()


def job_fields(model: str, **overrides: Any) -> dict[str, Any]:
    """The small job most tests train, as TrainingConfig fields (plain values: config files are written from it)."""
    return {
        "model_name": model,
        "dataset": "facts.jsonl",
        "max_steps": 6,
        "max_length": 128,
        "per_device_train_batch_size": 4,
        "save_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "lora": {"r": 8},
        **overrides,
    }


def job_config(model: str, **overrides: Any) -> pb.TrainingConfig:
    return json_format.ParseDict(job_fields(model, **overrides), pb.TrainingConfig())


def train_to_end(
    stub: pb_grpc.FineTuneServiceStub, config: pb.TrainingConfig, **request: Any
) -> tuple[pb.Job, list[pb.JobEvent]]:
    stream = stub.Train(pb.TrainRequest(config=config, **request), timeout=300)
    first = next(stream)
    assert first.WhichOneof("kind") == "job"
    events = [message.event for message in stream]
    return first.job, events


def assert_gap_free(events: list[pb.JobEvent], start: int = 1) -> None:
    assert [e.sequence for e in events] == list(range(start, start + len(events)))


def states_of(events: list[pb.JobEvent]) -> list[int]:
    return [e.state_change.current for e in events if e.WhichOneof("kind") == "state_change"]


def log_lines(events: list[pb.JobEvent]) -> list[str]:
    return [e.log.message for e in events if e.WhichOneof("kind") == "log"]


@pytest.mark.slow
def test_train_streams_the_job_then_every_event_until_it_succeeds(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path, jobs_server: RunningServer
) -> None:
    job, events = train_to_end(stub, job_config(tiny_model_dir.name), display_name="first")
    assert job.id.startswith("job-") and job.state == pb.JOB_STATE_QUEUED and job.display_name == "first"
    assert job.config.lora.alpha == 16, "the job records its resolved config"
    assert_gap_free(events)
    assert states_of(events) == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED]
    progress = [e.progress for e in events if e.WhichOneof("kind") == "progress"]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6]
    assert all(p.total_steps == 6 and p.tokens_per_second > 0 and p.memory.peak_bytes > 0 for p in progress)
    checkpoints = [e.checkpoint.step for e in events if e.WhichOneof("kind") == "checkpoint"]
    assert checkpoints[:3] == [2, 4, 6]
    results = [e.result for e in events if e.WhichOneof("kind") == "result"]
    assert len(results) == 1 and results[0].steps == 6 and results[0].trained_tokens > 0
    assert events[-1].state_change.current == pb.JOB_STATE_SUCCEEDED, "the last event is the final state change"

    stored = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
    assert stored.state == pb.JOB_STATE_SUCCEEDED and stored.last_sequence == events[-1].sequence
    assert stored.result.steps == 6 and stored.progress.step == 6
    assert stored.start_time.seconds > 0 and stored.end_time.ToNanoseconds() >= stored.start_time.ToNanoseconds()
    adapter = jobs_server.data_dir / stored.result.adapter_location
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "chat_template.jinja").is_file()


def test_watch_replays_from_any_sequence_and_ends_with_the_job(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path
) -> None:
    job, events = train_to_end(stub, job_config(tiny_model_dir.name))
    for after in (0, 3, len(events) - 1):
        replayed = [m.event for m in stub.WatchJob(pb.WatchJobRequest(job_id=job.id, after_sequence=after), timeout=30)]
        assert replayed == events[after:]
    nothing = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id, after_sequence=len(events)), timeout=30))
    assert nothing == []
    with pytest.raises(grpc.RpcError) as beyond:
        list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id, after_sequence=len(events) + 1), timeout=30))
    assert beyond.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_request_id_makes_train_idempotent(stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path) -> None:
    first_job, first_events = train_to_end(stub, job_config(tiny_model_dir.name), request_id="same-request-42")
    again_job, again_events = train_to_end(stub, job_config(tiny_model_dir.name), request_id="same-request-42")
    assert again_job.id == first_job.id
    assert again_events == first_events, "the repeated call streams the same job's events"


def test_many_watchers_receive_the_same_complete_sequence(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path
) -> None:
    stream = stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=8)), timeout=300)
    job = next(stream).job
    received: list[list[pb.JobEvent]] = [[] for _ in range(20)]

    def watch(index: int) -> None:
        for message in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=300):
            received[index].append(message.event)

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    train_events = [m.event for m in stream]
    for thread in threads:
        thread.join(timeout=300)
    assert all(events == train_events for events in received)
    assert_gap_free(train_events)
    assert states_of(train_events)[-1] == pb.JOB_STATE_SUCCEEDED


def test_cancel_a_queued_job_then_a_running_one(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path, jobs_server: RunningServer
) -> None:
    long_run = job_config(tiny_model_dir.name, max_steps=100000, save_steps=0)
    running_stream = stub.Train(pb.TrainRequest(config=long_run), timeout=300)
    running = next(running_stream).job
    queued = next(stub.Train(pb.TrainRequest(config=long_run), timeout=300)).job  # one slot: this one waits

    cancelled = stub.CancelJob(pb.CancelJobRequest(job_id=queued.id), timeout=10).job
    assert cancelled.state == pb.JOB_STATE_CANCELLED, "a queued job is cancelled at once"

    worker_pid = 0
    for message in running_stream:  # wait until the worker really trains
        if message.event.WhichOneof("kind") == "progress":
            worker_pid = int((jobs_server.data_dir / "jobs" / running.id / "worker.pid").read_text())
            break
    assert worker_pid > 0
    reply = stub.CancelJob(pb.CancelJobRequest(job_id=running.id), timeout=10).job
    assert reply.state == pb.JOB_STATE_RUNNING and reply.cancel_requested
    rest = [m.event for m in running_stream]
    assert states_of(rest)[-1] == pb.JOB_STATE_CANCELLED
    final = stub.GetJob(pb.GetJobRequest(job_id=running.id), timeout=10).job
    assert final.state == pb.JOB_STATE_CANCELLED and not final.cancel_requested
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)  # the worker process is gone

    with pytest.raises(grpc.RpcError) as finished:
        stub.CancelJob(pb.CancelJobRequest(job_id=running.id), timeout=10)
    assert finished.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_list_jobs_newest_first_paged_and_filtered(stub: pb_grpc.FineTuneServiceStub) -> None:
    everything = stub.ListJobs(pb.ListJobsRequest(page_size=1000), timeout=10).jobs
    assert len(everything) >= 4
    times = [j.create_time.ToNanoseconds() for j in everything]
    assert times == sorted(times, reverse=True)
    paged: list[str] = []
    token = ""
    while True:
        page = stub.ListJobs(pb.ListJobsRequest(page_size=2, page_token=token), timeout=10)
        paged += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert paged == [j.id for j in everything]
    cancelled = stub.ListJobs(pb.ListJobsRequest(states=[pb.JOB_STATE_CANCELLED]), timeout=10).jobs
    assert cancelled and all(j.state == pb.JOB_STATE_CANCELLED for j in cancelled)
    with pytest.raises(grpc.RpcError) as bad_token:
        stub.ListJobs(pb.ListJobsRequest(page_token="not-a-token"), timeout=10)
    assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_job_is_not_found(stub: pb_grpc.FineTuneServiceStub) -> None:
    for call in (
        lambda: stub.GetJob(pb.GetJobRequest(job_id="job-nope"), timeout=10),
        lambda: stub.CancelJob(pb.CancelJobRequest(job_id="job-nope"), timeout=10),
        lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id="job-nope"), timeout=10)),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_train_rejects_a_bad_config_exactly_like_validate(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path
) -> None:
    bad = job_config(tiny_model_dir.name, learning_rate=0.0)
    with pytest.raises(grpc.RpcError) as trained:
        next(stub.Train(pb.TrainRequest(config=bad), timeout=30))
    with pytest.raises(grpc.RpcError) as validated:
        stub.ValidateConfig(pb.ValidateConfigRequest(config=bad), timeout=30)
    assert trained.value.code() == validated.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trained.value.details() == validated.value.details()


def upload(
    stub: pb_grpc.FineTuneServiceStub,
    data: bytes,
    filename: str = "mine.jsonl",
    sha: str = "",
    metadata: tuple[tuple[str, str], ...] = (),
) -> Any:
    def messages() -> Iterator[pb.UploadDatasetRequest]:
        yield pb.UploadDatasetRequest(metadata=pb.UploadDatasetMetadata(filename=filename, sha256=sha))
        for start in range(0, len(data), 1000):
            yield pb.UploadDatasetRequest(chunk=data[start : start + 1000])

    return stub.UploadDataset(messages(), timeout=30, metadata=metadata)


def test_upload_is_checked_stored_once_and_usable_as_a_dataset(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path, jobs_server: RunningServer
) -> None:
    data = b"".join(b'{"instruction": "Name %d?", "output": "Item %d."}\n' % (i, i) for i in range(30))
    first = upload(stub, data, sha=hashlib.sha256(data).hexdigest())
    assert first.dataset.id == "ds-" + hashlib.sha256(data).hexdigest()[:16] and not first.already_existed
    assert first.dataset.report.num_valid == 30 and first.dataset.size_bytes == len(data)
    again = upload(stub, data, filename="renamed.jsonl")
    assert again.already_existed and again.dataset.id == first.dataset.id
    _, events = train_to_end(stub, job_config(tiny_model_dir.name, dataset=first.dataset.id, max_steps=2))
    assert states_of(events)[-1] == pb.JOB_STATE_SUCCEEDED


@pytest.mark.parametrize(
    ("data", "filename", "sha", "code"),
    [
        (b'{"text": "x"}\n' * 20000, "big.jsonl", "", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (b'{"text": "fine"}\n{broken\n', "bad.jsonl", "", grpc.StatusCode.INVALID_ARGUMENT),
        (b'{"text": "fine"}\n', "data.csv", "", grpc.StatusCode.INVALID_ARGUMENT),
        (b'{"text": "fine"}\n', "ok.jsonl", "0" * 64, grpc.StatusCode.DATA_LOSS),
    ],
)
def test_bad_uploads_are_refused_and_nothing_is_kept(
    stub: pb_grpc.FineTuneServiceStub,
    jobs_server: RunningServer,
    data: bytes,
    filename: str,
    sha: str,
    code: grpc.StatusCode,
) -> None:
    uploads = jobs_server.data_dir / "datasets"
    before = sorted(p.name for p in uploads.glob("*"))
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, data, filename=filename, sha=sha)
    assert caught.value.code() == code
    assert sorted(p.name for p in uploads.glob("*")) == before


def test_an_upload_over_the_limit_names_the_quota(stub: pb_grpc.FineTuneServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, b'{"text": "x"}\n' * 20000, filename="big.jsonl")
    refused = from_rpc_error(caught.value)
    assert (refused.code, refused.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE")
    (quota,) = refused.quota_violations
    assert (quota.quota_id, quota.quota_metric) == ("max_upload_bytes", "finetune.sage/upload_bytes")
    assert "200000 bytes" in quota.description
    assert refused.retry_delay is None, "the same upload would be refused again: no RetryInfo"


def test_unknown_uploaded_dataset_is_not_found(stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        config = job_config(tiny_model_dir.name, dataset="ds-ffffffffffffffff")
        next(stub.Train(pb.TrainRequest(config=config), timeout=30))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    (missing,) = from_rpc_error(caught.value).resources
    assert (missing.resource_type, missing.resource_name) == ("finetune.sage/Dataset", "ds-ffffffffffffffff")


def test_a_second_job_on_the_same_data_tokenizes_nothing(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path, jobs_server: RunningServer
) -> None:
    # Data no other test trains on; the second job names a copy: the cache is keyed by content, not by name.
    rows = [
        {"instruction": f"Which colour is flag {i}?", "output": f"Flag {i} is colour {i * 7 % 11}."} for i in range(40)
    ]
    write_jsonl(jobs_server.dataset_root / "flags.jsonl", rows)
    write_jsonl(jobs_server.dataset_root / "flags-copy.jsonl", rows)
    _, first = train_to_end(stub, job_config(tiny_model_dir.name, dataset="flags.jsonl", max_steps=2))
    _, second = train_to_end(stub, job_config(tiny_model_dir.name, dataset="flags-copy.jsonl", max_steps=2))
    assert states_of(first)[-1] == states_of(second)[-1] == pb.JOB_STATE_SUCCEEDED

    built = [line for line in log_lines(first) if line.startswith("tokenized 40 examples into the token cache in ")]
    assert len(built) == 1, log_lines(first)
    key = built[0].rsplit("key ", 1)[1].rstrip(")")
    assert f"token cache hit: {key} (40 examples)" in log_lines(second)
    assert not any(line.startswith("tokenized") for line in log_lines(second)), "the second job tokenized"
    cache = TokenCacheDir(DataDir(jobs_server.data_dir).token_cache)
    assert cache.entry(key).tokens.is_file() and cache.staging() == []


def test_a_dataset_in_use_stays_and_deleting_it_frees_its_file_and_token_cache(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path, jobs_server: RunningServer
) -> None:
    data = b"".join(b'{"instruction": "Delete me %d?", "output": "Gone %d."}\n' % (i, i) for i in range(20))
    dataset = upload(stub, data, filename="doomed.jsonl").dataset
    assert dataset.id in {d.id for d in stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets}
    assert stub.GetDataset(pb.GetDatasetRequest(dataset_id=dataset.id), timeout=10).dataset == dataset

    stream = stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name, dataset=dataset.id, max_steps=10_000)))
    job = next(stream).job
    next(e for e in (m.event for m in stream) if e.WhichOneof("kind") == "progress")  # tokenized, training
    with pytest.raises(grpc.RpcError) as in_use:
        stub.DeleteDataset(pb.DeleteDatasetRequest(dataset_id=dataset.id), timeout=10)
    refused = from_rpc_error(in_use.value)
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION and refused.reason == "DATASET_IN_USE"
    assert refused.metadata["job_id"] == job.id and job.id in refused.message
    stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10)
    assert states_of([m.event for m in stream])[-1] == pb.JOB_STATE_CANCELLED

    cache = TokenCacheDir(DataDir(jobs_server.data_dir).token_cache)
    built = [e for e in cache.entries() if dataset.sha256 in e.meta.read_text()]
    assert len(built) == 1
    file = DataDir(jobs_server.data_dir).uploaded_dataset(dataset.id, ".jsonl")
    assert file.is_file()
    deleted = stub.DeleteDataset(pb.DeleteDatasetRequest(dataset_id=dataset.id), timeout=10)
    assert deleted.dataset == dataset and deleted.token_cache_entries_removed == 1
    assert deleted.freed_bytes > len(data)  # the file and its token cache entry
    assert not file.exists() and not built[0].root.exists()
    assert dataset.id not in {d.id for d in stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets}
    for call in (stub.GetDataset, stub.DeleteDataset):
        request = (pb.GetDatasetRequest if call is stub.GetDataset else pb.DeleteDatasetRequest)(dataset_id=dataset.id)
        with pytest.raises(grpc.RpcError) as gone:
            call(request, timeout=10)
        missing = from_rpc_error(gone.value)
        assert missing.code == grpc.StatusCode.NOT_FOUND
        assert [r.resource_name for r in missing.resources] == [dataset.id]


@pytest.mark.slow
def test_checkpoints_are_listed_with_their_evaluation_and_the_best_is_exported(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path
) -> None:
    config = job_config(
        tiny_model_dir.name, eval_split=0.25, eval_steps=2, save_steps=2, save_total_limit=3, learning_rate=5e-3
    )
    job, events = train_to_end(stub, config)
    assert states_of(events)[-1] == pb.JOB_STATE_SUCCEEDED
    evals = {e.eval.step: e.eval for e in events if e.WhichOneof("kind") == "eval"}
    saved = {e.checkpoint.step: e.checkpoint for e in events if e.WhichOneof("kind") == "checkpoint"}
    checkpoints = stub.ListCheckpoints(pb.ListCheckpointsRequest(job_id=job.id), timeout=10).checkpoints
    assert [c.step for c in checkpoints] == sorted(saved) == [2, 4, 6]
    for checkpoint in checkpoints:
        assert checkpoint.eval == evals[checkpoint.step] and checkpoint.size_bytes == saved[checkpoint.step].size_bytes
        assert checkpoint.create_time.seconds > 0
    best = min(checkpoints, key=lambda c: (c.eval.eval_loss, -c.step))

    request = pb.ExportRequest(job_id=job.id, format=pb.EXPORT_FORMAT_ADAPTER, best_checkpoint_by="eval_loss")
    artifact = list(stub.Export(request, timeout=120))[-1].artifact
    assert artifact.step == best.step

    both = pb.ExportRequest(job_id=job.id, format=pb.EXPORT_FORMAT_ADAPTER, best_checkpoint_by="eval_loss")
    both.checkpoint_step = 2
    unknown = pb.ExportRequest(job_id=job.id, format=pb.EXPORT_FORMAT_ADAPTER, best_checkpoint_by="bleu")
    for bad, code in ((both, grpc.StatusCode.INVALID_ARGUMENT), (unknown, grpc.StatusCode.FAILED_PRECONDITION)):
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Export(bad, timeout=60))
        error = from_rpc_error(caught.value)
        assert error.code == code and [v.field for v in error.violations] == ["best_checkpoint_by"]
