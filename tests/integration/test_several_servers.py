"""Two real servers on one PostgreSQL store and one data dir: one queue, events and cancellation across servers,
and a dead server's job resumed by the other once its lease expires (`--lease-seconds 3`)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.storage.layout import DataDir, JobDir
from finetune_server.storage.postgres_store import LISTENER_APPLICATION

from ..postgres_cluster import PostgresCluster
from .conftest import RunningServer, logged, start_server, stop_server
from .test_jobs import assert_gap_free, job_config, log_lines, states_of

LEASE_SECONDS = 3
DEADLINE_S = 120


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, server_roots: tuple[Path, Path], postgres_cluster: PostgresCluster
) -> Iterator[tuple[RunningServer, RunningServer, str]]:
    """Servers A and B, started together on one fresh database and one data dir."""
    url = postgres_cluster.new_database()
    data_dir = tmp_path_factory.mktemp("shared") / "data"
    extra = ("--store", url, "--lease-seconds", str(LEASE_SECONDS))
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(
            lambda name: start_server(tmp_path_factory.mktemp(name), *server_roots, *extra, data_dir=data_dir),
            ["server-a", "server-b"],
        )
    yield a, b, url.rsplit("/", 1)[1]
    for server in (a, b):
        stop_server(server)


def ancestors(pid: int) -> list[int]:
    """The pids above `pid`, nearest first, up to init."""
    found = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        found.append(pid)
    return found


def running_on(job_id: str, servers: tuple[RunningServer, ...]) -> tuple[RunningServer, RunningServer]:
    """(the server whose worker trains the job, the other one): the worker descends from its server (a child of the
    fork server of its warm pool, which is the server's child)."""
    pid_file = JobDir(DataDir(servers[0].data_dir).jobs / job_id).worker_pid
    wait_for(pid_file.exists, "the job's worker has started")
    lineage = ancestors(int(pid_file.read_text()))
    [owner] = [s for s in servers if s.process.pid in lineage]
    [other] = [s for s in servers if s is not owner]
    return owner, other


def watch_all(server: RunningServer, job_id: str, into: list[pb.JobEvent]) -> threading.Thread:
    def run() -> None:
        channel, stub = server.stub()
        with channel:
            into.extend(m.event for m in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=300))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def listeners(cluster: PostgresCluster, database: str) -> int:
    rows = cluster.sql(
        f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{LISTENER_APPLICATION}'"
        f" AND datname = '{database}'"
    )
    return int(rows[0][0])  # type: ignore[call-overload]


def assert_resumed_elsewhere(events: list[pb.JobEvent], final: pb.Job, steps: int) -> None:
    """A job whose server died mid-training, resumed by another server once the lease expired, to its end."""
    assert_gap_free(events)
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.result.steps == steps and final.resume_count >= 1
    assert states_of(events) == [
        pb.JOB_STATE_QUEUED,
        pb.JOB_STATE_RUNNING,
        pb.JOB_STATE_QUEUED,  # the dead server's lease expired
        pb.JOB_STATE_RUNNING,
        pb.JOB_STATE_SUCCEEDED,
    ]
    assert any(line.startswith("resumed from the checkpoint at step ") for line in log_lines(events))
    progress = [e.progress for e in events if e.WhichOneof("kind") == "progress"]
    assert progress[-1].step == steps and all(p.total_steps == steps for p in progress)


@pytest.mark.slow
def test_a_job_is_watched_live_from_the_other_server_even_when_the_listeners_are_cut(
    pair: tuple[RunningServer, RunningServer, str], tiny_model_dir: Path, postgres_cluster: PostgresCluster
) -> None:
    a, b, database = pair
    wait_for(lambda: listeners(postgres_cluster, database) == 2, "both servers listen")
    channel, stub = a.stub()
    with channel:
        stream = stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=12)), timeout=300)
        job = next(stream).job
        owner, other = running_on(job.id, (a, b))
        from_other: list[pb.JobEvent] = []
        watcher = watch_all(other, job.id, from_other)
        # The database cuts both listeners mid-training: notices are lost until they reconnect; nothing else is.
        postgres_cluster.sql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{LISTENER_APPLICATION}'"
        )
        from_train = [m.event for m in stream]
    watcher.join(timeout=DEADLINE_S)
    assert not watcher.is_alive()
    channel, owner_stub = owner.stub()
    with channel:
        from_owner = [m.event for m in owner_stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=60)]
    assert_gap_free(from_owner)
    assert from_other == from_owner, "the other server streams exactly the owner's events"
    assert from_train == from_owner
    assert states_of(from_other) == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED]
    assert [e.progress.step for e in from_other if e.WhichOneof("kind") == "progress"] == list(range(1, 13))
    wait_for(lambda: listeners(postgres_cluster, database) == 2, "the listeners reconnected")


@pytest.mark.slow
def test_a_job_running_on_one_server_is_cancelled_from_the_other(
    pair: tuple[RunningServer, RunningServer, str], tiny_model_dir: Path
) -> None:
    a, b, _ = pair
    channel, stub = a.stub()
    with channel:
        stream = stub.Train(
            pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=100000, save_steps=0)), timeout=300
        )
        job = next(stream).job
        owner, other = running_on(job.id, (a, b))
        worker_pid = int(JobDir(DataDir(owner.data_dir).jobs / job.id).worker_pid.read_text())
        other_channel, other_stub = other.stub()
        with other_channel:
            reply = other_stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10).job
            assert reply.cancel_requested
            rest = [m.event for m in stream]
            final = other_stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
    assert states_of(rest)[-1] == pb.JOB_STATE_CANCELLED
    assert final.state == pb.JOB_STATE_CANCELLED
    wait_for(lambda: not Path(f"/proc/{worker_pid}").exists(), "the worker has exited", timeout=30)


@pytest.mark.slow
def test_one_artifact_asked_of_both_servers_at_once_is_exported_once(
    pair: tuple[RunningServer, RunningServer, str], tiny_model_dir: Path
) -> None:
    a, b, _ = pair
    channel, stub = a.stub()
    with channel:
        stream = stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name)), timeout=300)
        job = next(stream).job
        assert states_of([m.event for m in stream])[-1] == pb.JOB_STATE_SUCCEEDED
    request = pb.ExportRequest(job_id=job.id, format=pb.EXPORT_FORMAT_MERGED)
    started = threading.Barrier(2)

    def export_on(server: RunningServer) -> list[pb.ExportResponse]:
        server_channel, server_stub = server.stub()
        with server_channel:
            started.wait(timeout=30)
            return list(server_stub.Export(request, timeout=300))

    with ThreadPoolExecutor(2) as pool:
        from_a, from_b = pool.map(export_on, (a, b))
    assert from_a[-1].artifact == from_b[-1].artifact, "both callers get the one artifact"
    # One export worker ran, on one of the servers; the other server's caller waited for its record.
    started_on = {name: logged(server, "export.started") for name, server in (("a", a), ("b", b))}
    assert sorted(len(records) for records in started_on.values()) == [0, 1], started_on
    waited = from_b if started_on["a"] else from_a
    assert any(m.progress.stage == "waiting" for m in waited[:-1])


def test_kill_9_of_a_server_mid_training_and_the_other_resumes_the_job(
    pair: tuple[RunningServer, RunningServer, str], tiny_model_dir: Path
) -> None:
    a, b, _ = pair
    steps = 40
    channel, stub = a.stub()
    with channel:
        stream = stub.Train(
            pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=steps, save_steps=5, logging_steps=5)),
            timeout=300,
        )
        job = next(stream).job
        owner, survivor = running_on(job.id, (a, b))
        for message in stream:
            if message.event.WhichOneof("kind") == "checkpoint":
                break
        owner.process.send_signal(signal.SIGKILL)
        owner.process.wait(timeout=30)
    channel, survivor_stub = survivor.stub()
    with channel:
        events = [m.event for m in survivor_stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=300)]
        final = survivor_stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
    assert_resumed_elsewhere(events, final, steps)
    requeued = [e.state_change.message for e in events if e.WhichOneof("kind") == "state_change"][2]
    assert "lease" in requeued
