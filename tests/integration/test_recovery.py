"""Crashes lose no job and no event: kill -9 of the server, and of the worker, in the middle of training."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import pytest

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb

from .conftest import RunningServer, start_server, stop_server
from .test_jobs import assert_gap_free, job_config, states_of

STEPS = 300


def long_job(model: str) -> pb.TrainingConfig:
    return job_config(model, max_steps=STEPS, save_steps=20, logging_steps=5)


def wait_for_checkpoint(stream: grpc.Future) -> pb.Job:
    job = next(stream).job
    for message in stream:
        if message.event.WhichOneof("kind") == "checkpoint":
            return job
    raise AssertionError("the job ended before its first checkpoint")


def assert_finished_with_planned_steps(events: list[pb.JobEvent], job: pb.Job) -> None:
    assert_gap_free(events)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.result.steps == STEPS
    assert job.resume_count >= 1
    resumed = [e.log.message for e in events if e.WhichOneof("kind") == "log" and "resumed from" in e.log.message]
    assert resumed, "an event says the job resumed from a checkpoint"
    progress = [e.progress for e in events if e.WhichOneof("kind") == "progress"]
    assert progress[-1].step == STEPS and all(p.total_steps == STEPS for p in progress)


@pytest.mark.slow
def test_kill_9_of_the_server_mid_training_then_restart(
    tmp_path: Path, server_roots: tuple[Path, Path], tiny_model_dir: Path
) -> None:
    first = start_server(tmp_path, *server_roots)
    channel, stub = first.stub()
    stream = stub.Train(pb.TrainRequest(config=long_job(tiny_model_dir.name)), timeout=300)
    job = wait_for_checkpoint(stream)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=30)
    channel.close()

    second = start_server(tmp_path, *server_roots)  # same data dir
    channel, stub = second.stub()
    try:
        events = [m.event for m in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=300)]
        final = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
    finally:
        channel.close()
        stop_server(second)
    assert_finished_with_planned_steps(events, final)
    assert states_of(events) == [
        pb.JOB_STATE_QUEUED,
        pb.JOB_STATE_RUNNING,
        pb.JOB_STATE_QUEUED,  # re-queued by the restarted server
        pb.JOB_STATE_RUNNING,
        pb.JOB_STATE_SUCCEEDED,
    ]


@pytest.mark.slow
def test_kill_9_of_the_worker_mid_training_resumes_it(server: RunningServer, tiny_model_dir: Path) -> None:
    """On the session's server: the server itself lives on, and its warm pool serves the resumed attempt."""
    channel, stub = server.stub()
    try:
        stream = stub.Train(pb.TrainRequest(config=long_job(tiny_model_dir.name)), timeout=300)
        job = wait_for_checkpoint(stream)
        pid = int((server.data_dir / "jobs" / job.id / "worker.pid").read_text())
        os.killpg(pid, signal.SIGKILL)
        for _ in stream:  # the Train stream goes on to the end of the job
            pass
        events = [m.event for m in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=300)]
        final = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
    finally:
        channel.close()
    assert_finished_with_planned_steps(events, final)
    died = [e.log.message for e in events if e.WhichOneof("kind") == "log" and "worker died" in e.log.message]
    assert died and "SIGKILL" in died[0]
