"""A PostgreSQL job store lost while the server runs: health says NOT_SERVING and calls are UNAVAILABLE with a
RetryInfo; once the database is back, health says SERVING and the same calls work. A job training through the
outage keeps training, and what its worker reported meanwhile is written once the database is back: nothing lost,
the sequence gap-free, the same attempt. Each test has a cluster of its own: it is stopped here."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from finetune_client import from_rpc_error
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.storage.layout import DataDir, JobDir

from ..postgres_cluster import start_cluster
from .conftest import logged, start_server, stop_server
from .test_jobs import assert_gap_free, job_config, log_lines, states_of

DEADLINE_S = 60


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)  # polling health: the probe's interval is the server's


def health_status(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def wait_for_health(channel: grpc.Channel, status: int) -> None:
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    wait_until(lambda: health_status(channel) == status, f"health says {name}")


@pytest.mark.slow
def test_health_follows_the_store_and_calls_are_unavailable_while_it_is_lost(
    tmp_path: Path, server_roots: tuple[Path, Path]
) -> None:
    cluster = start_cluster()
    server = None
    try:
        server = start_server(tmp_path, *server_roots, "--store", cluster.new_database())
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FineTuneServiceStub(channel)

            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            assert list(stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs) == []

            cluster.pg_ctl("stop", "-m", "fast")
            wait_for_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING)
            with pytest.raises(grpc.RpcError) as lost:
                stub.ListJobs(pb.ListJobsRequest(), timeout=30)
            error = from_rpc_error(lost.value)
            assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "STORE_UNAVAILABLE"
            assert error.retry_delay is not None and error.retry_delay > 0

            cluster.start()
            wait_for_health(channel, health_pb2.HealthCheckResponse.SERVING)
            assert list(stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs) == []
    finally:
        if server is not None:
            stop_server(server)
        cluster.stop()


@pytest.mark.slow
def test_a_job_trains_through_a_store_outage_and_loses_no_event(
    tmp_path: Path, server_roots: tuple[Path, Path], tiny_model_dir: Path
) -> None:
    cluster = start_cluster()
    server = None
    steps = 600
    try:
        server = start_server(tmp_path, *server_roots, "--store", cluster.new_database())
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FineTuneServiceStub(channel)
            config = job_config(tiny_model_dir.name, max_steps=steps, save_steps=25, save_total_limit=0)
            stream = stub.Train(pb.TrainRequest(config=config), timeout=300)
            job = next(stream).job
            for message in stream:  # training has begun
                if message.event.WhichOneof("kind") == "progress":
                    break
            job_dir = JobDir(DataDir(server.data_dir).jobs / job.id)

            def newest_checkpoint() -> int:
                return max((step for step, _ in job_dir.complete_checkpoints()), default=0)

            cluster.pg_ctl("stop", "-m", "fast")
            # A write of the job's events fails (after the pool's wait for a connection) and the writes queue...
            wait_until(lambda: bool(logged(server, "job.store_unreachable_writes_queued")), "the writes queue")
            at_outage = newest_checkpoint()
            # ...while the worker keeps training with the database gone: its checkpoints keep landing on disk.
            wait_until(lambda: newest_checkpoint() >= at_outage + 50, "two more checkpoints are saved")
            stream.cancel()  # a stream may end UNAVAILABLE while the store is lost; callers watch again after it
            cluster.start()
            # A caller watches again once health says SERVING (before that the store may still be unreachable).
            wait_for_health(channel, health_pb2.HealthCheckResponse.SERVING)
            events = [m.event for m in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=120)]
    finally:
        if server is not None:
            stop_server(server)
        cluster.stop()
    assert_gap_free(events)
    assert [e.progress.step for e in events if e.WhichOneof("kind") == "progress"] == list(range(1, steps + 1))
    checkpointed = [e.checkpoint.step for e in events if e.WhichOneof("kind") == "checkpoint"]
    assert checkpointed == list(range(25, steps + 1, 25)), "the checkpoints saved during the outage are all reported"
    assert states_of(events) == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED]
    assert not [line for line in log_lines(events) if "resumed" in line or "died" in line], "one attempt throughout"
    assert logged(server, "job.queued_writes_landed")
