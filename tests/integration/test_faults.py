"""Injected faults on a real server (FINETUNE_FAULTS, inherited by its workers): an out-of-memory error in the
forward pass and a full disk while writing a checkpoint each end the job FAILED with a typed, actionable error, keep
the server serving and the data consistent, and free the slot for the next job."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.faults import ENV_VAR, KILL_FIRED_MARKER, Faults, parse
from finetune_server.storage.layout import CHECKPOINT_COMPLETE_MARKER as COMPLETE_MARKER
from finetune_server.training.config import TrainingConfig
from finetune_server.training.engine.errors import disk_full_detail, out_of_memory_hint

from .conftest import RunningServer, start_server, stop_server
from .test_jobs import assert_gap_free, job_config, states_of, train_to_end

OOM_STEP = 5
DISK_FULL_CHECKPOINT = 2  # the 2nd checkpoint a worker writes fails


def test_fault_spec_parses_and_rejects_what_would_silently_test_nothing() -> None:
    assert parse("") == Faults() and not parse(" , ").any
    assert parse("disk_full_at_checkpoint=2, oom_at_step=3") == Faults(disk_full_at_checkpoint=2, oom_at_step=3)
    for bad in ("oom_at_stpe=3", "oom_at_step", "oom_at_step=x", "oom_at_step=0"):
        with pytest.raises(ValueError, match=ENV_VAR):
            parse(bad)


def test_a_full_disk_is_recognised_however_the_writer_wraps_it() -> None:
    enospc = OSError(errno.ENOSPC, "No space left on device")
    torch_style = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    torch_style.__context__ = enospc  # torch.save into a Python file: the OSError is the context
    safetensors_style = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_full_detail(enospc) == "No space left on device"
    assert disk_full_detail(torch_style) == "No space left on device"
    assert disk_full_detail(safetensors_style) is not None
    assert disk_full_detail(OSError(errno.EACCES, "Permission denied")) is None
    assert disk_full_detail(RuntimeError("unexpected pos 1 vs 2")) is None


def test_out_of_memory_hint_is_computed_from_the_config() -> None:
    hint = out_of_memory_hint(
        TrainingConfig(per_device_train_batch_size=6, gradient_accumulation_steps=2, max_length=1024)
    )
    assert "per_device_train_batch_size=3 with gradient_accumulation_steps=4 (the same effective batch of 12)" in hint
    assert "gradient_checkpointing=true" in hint and "max_length=512" in hint and "load_in_4bit=true" in hint
    done = TrainingConfig(per_device_train_batch_size=1, gradient_checkpointing=True, max_length=64, load_in_4bit=True)
    assert out_of_memory_hint(done).startswith("Every memory saving is already on")


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory: pytest.TempPathFactory, server_roots: tuple[Path, Path]) -> Iterator[RunningServer]:
    with pytest.MonkeyPatch.context() as patch:  # start_server copies os.environ into the server's environment
        patch.setenv(ENV_VAR, f"oom_at_step={OOM_STEP},disk_full_at_checkpoint={DISK_FULL_CHECKPOINT}")
        running = start_server(tmp_path_factory.mktemp("faulty-server"), *server_roots)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def channel(faulty_server: RunningServer) -> Iterator[grpc.Channel]:
    channel, _ = faulty_server.stub()
    yield channel
    channel.close()


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.FineTuneServiceStub:
    return pb_grpc.FineTuneServiceStub(channel)


def assert_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def assert_database_intact(server: RunningServer) -> None:
    with sqlite3.connect(f"file:{server.data_dir / 'finetune.db'}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


@pytest.mark.slow
def test_out_of_memory_fails_the_job_with_a_concrete_hint_and_frees_the_slot(
    stub: pb_grpc.FineTuneServiceStub, channel: grpc.Channel, tiny_model_dir: Path, faulty_server: RunningServer
) -> None:
    # No checkpoint before the end (save_steps beyond max_steps), so only the OOM fault can fire.
    config = job_config(
        tiny_model_dir.name, max_steps=8, save_steps=100, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    job, events = train_to_end(stub, config)
    assert_gap_free(events)
    assert states_of(events) == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_FAILED]
    failed = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
    assert failed.state == pb.JOB_STATE_FAILED and failed.resume_count == 0, "a typed error is not retried"
    error = failed.error
    assert error.reason == "OUT_OF_MEMORY" and error.step == OOM_STEP and f"at step {OOM_STEP}" in error.message
    # Concrete: computed from this job's batch 4 x accumulation 2 and max_length 128.
    assert "per_device_train_batch_size=2 with gradient_accumulation_steps=4" in error.hint
    assert "same effective batch of 8" in error.hint
    assert "gradient_checkpointing=true" in error.hint and "max_length=64" in error.hint
    assert [e.progress.step for e in events if e.WhichOneof("kind") == "progress"] == list(range(1, OOM_STEP))

    assert_serving(channel)
    # The slot is free: a job that stops before the faulty step runs to the end.
    after, after_events = train_to_end(stub, job_config(tiny_model_dir.name, max_steps=OOM_STEP - 1, save_steps=100))
    assert states_of(after_events)[-1] == pb.JOB_STATE_SUCCEEDED
    assert stub.GetJob(pb.GetJobRequest(job_id=after.id), timeout=10).job.result.steps == OOM_STEP - 1
    running = stub.ListJobs(pb.ListJobsRequest(states=[pb.JOB_STATE_RUNNING, pb.JOB_STATE_QUEUED]), timeout=10).jobs
    assert list(running) == []
    assert_database_intact(faulty_server)


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_fails_the_job_and_keeps_the_previous_checkpoint_whole(
    stub: pb_grpc.FineTuneServiceStub, channel: grpc.Channel, tiny_model_dir: Path, faulty_server: RunningServer
) -> None:
    # Stops before OOM_STEP; checkpoints at steps 2 and 4: the second one hits the full disk.
    job, events = train_to_end(stub, job_config(tiny_model_dir.name, max_steps=OOM_STEP - 1, save_steps=2))
    assert_gap_free(events)
    assert states_of(events)[-1] == pb.JOB_STATE_FAILED
    failed = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
    error = failed.error
    assert error.reason == "DISK_FULL" and error.step == 4, error
    assert "No space left on device" in error.message and "step 2 is the newest complete" in error.message
    assert "Free at least" in error.hint and "save_total_limit" in error.hint
    assert [e.checkpoint.step for e in events if e.WhichOneof("kind") == "checkpoint"] == [2]

    checkpoints = faulty_server.data_dir / "jobs" / job.id / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"], "no staging folder is left"
    complete = checkpoints / "step-00000002"
    assert (complete / COMPLETE_MARKER).read_text().strip() == "2"
    assert {p.name for p in complete.iterdir()} >= {"adapter", "optimizer.pt", "scheduler.pt", "rng.pt"}
    assert not (faulty_server.data_dir / "jobs" / job.id / "adapter").exists(), "no final adapter was published"

    assert_serving(channel)
    assert_database_intact(faulty_server)


@pytest.mark.slow
def test_a_worker_killed_in_the_middle_of_a_checkpoint_write_resumes_from_the_previous_one(
    tmp_path: Path, server_roots: tuple[Path, Path], tiny_model_dir: Path
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_VAR, "kill_at_checkpoint=2")  # SIGKILL halfway through the save of step 4
        server = start_server(tmp_path, *server_roots)
    channel, stub = server.stub()
    try:
        config = job_config(tiny_model_dir.name, max_steps=6, save_steps=2, save_total_limit=5)  # keeps all three
        job, events = train_to_end(stub, config)
        done = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
    finally:
        channel.close()
        stop_server(server)
    assert_gap_free(events)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.result.steps == 6 and done.resume_count == 1
    logs = [e.log.message for e in events if e.WhichOneof("kind") == "log"]
    assert any("SIGKILL" in line for line in logs), logs
    assert "resumed from the checkpoint at step 2" in logs
    # The killed save left no event and no folder: step 4 was written again, whole, by the resumed attempt.
    assert [e.checkpoint.step for e in events if e.WhichOneof("kind") == "checkpoint"] == [2, 4, 6]
    checkpoints = server.data_dir / "jobs" / job.id / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]
    for step in (2, 4, 6):
        assert (checkpoints / f"step-{step:08d}" / COMPLETE_MARKER).read_text().strip() == str(step)
    assert (server.data_dir / "jobs" / job.id / KILL_FIRED_MARKER).is_file(), "the fault really fired"
    assert_database_intact(server)
