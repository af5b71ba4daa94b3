"""`finetune serve --executor ray` on a real local Ray cluster (started here, stopped after): jobs train in actors named
after them and stream what local workers stream; cancel, a killed actor, a full cluster, a job that cannot fit, an
unreachable head and a data dir the cluster cannot see each behave as they should; and two servers on one PostgreSQL
store and one cluster, the one running a job killed, the other resuming it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import ray

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.storage import layout
from finetune_server.workers.protocol import ORPHAN_EXIT_S

from ..postgres_cluster import PostgresCluster
from ..unit.test_ddp import COMMON as DDP_COMMON
from ..unit.test_ddp import _facts as facts
from .conftest import RunningServer, logged, start_server, stop_server
from .ray_cluster import RayHead, start_head, start_worker_node
from .test_jobs import assert_gap_free, job_config, log_lines, states_of, train_to_end
from .test_several_servers import LEASE_SECONDS, assert_resumed_elsewhere, wait_for
from .test_validate_config import rejected

pytestmark = pytest.mark.slow
NAMESPACE = "sage-finetune-tests"
HEAD_CPUS = 3
GONE_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    head = start_head(num_cpus=HEAD_CPUS)
    ray.init(address=head.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    try:
        yield head
    finally:
        ray.shutdown()
        head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)  # its sockets, session files and logs


def ray_server(
    tmp: Path, roots: tuple[Path, Path], head: RayHead, *extra: str, data_dir: Path | None = None
) -> RunningServer:
    flags = ["--executor", "ray", "--ray-address", head.address, "--ray-namespace", NAMESPACE]
    return start_server(tmp, *roots, *flags, "--ray-cpus-per-job", "1", *extra, data_dir=data_dir)


@pytest.fixture(scope="module")
def ray_jobs(
    tmp_path_factory: pytest.TempPathFactory, server_roots: tuple[Path, Path], ray_head: RayHead
) -> Iterator[tuple[RunningServer, pb_grpc.FineTuneServiceStub]]:
    running = ray_server(tmp_path_factory.mktemp("ray-server"), server_roots, ray_head)
    channel, stub = running.stub()
    yield running, stub
    channel.close()
    stop_server(running)


def kinds(events: list[pb.JobEvent]) -> set[str]:
    return {str(e.WhichOneof("kind")) for e in events}


def actor_gone(job_id: str) -> bool:
    try:
        ray.get_actor(job_id, namespace=NAMESPACE)
    except ValueError:
        return True
    return False


def wait_until_gone(job_id: str) -> None:
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while not actor_gone(job_id):
        assert time.monotonic() < deadline, f"the actor of {job_id} is still there"
        time.sleep(0.2)  # polling the cluster's actor table, under a deadline


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def until(stream: Any, kind: str, contains: str = "") -> pb.JobEvent:
    for message in stream:
        event = message.event
        if event.WhichOneof("kind") == kind and contains in (event.log.message if kind == "log" else ""):
            return event
    raise AssertionError(f"the job ended before a {kind} event {contains!r}")


def test_a_job_trains_in_its_actor_and_streams_what_a_local_worker_streams(
    ray_jobs: tuple[RunningServer, pb_grpc.FineTuneServiceStub], tiny_model_dir: Path
) -> None:
    running, stub = ray_jobs
    config = job_config(tiny_model_dir.name, max_steps=4, eval_split=0.25, eval_steps=2)
    job, events = train_to_end(stub, config)
    assert_gap_free(events)
    assert states_of(events) == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED]
    assert kinds(events) == {"state_change", "progress", "eval", "checkpoint", "result", "log"}  # as a local job's
    assert [e.progress.step for e in events if e.WhichOneof("kind") == "progress"] == [1, 2, 3, 4]
    assert {e.checkpoint.step for e in events if e.WhichOneof("kind") == "checkpoint"} == {2, 4}
    assert {e.eval.step for e in events if e.WhichOneof("kind") == "eval"} == {2, 4}
    assert any(line.startswith("the attempt runs on the Ray node ") for line in log_lines(events))
    worker_log = running.data_dir / "jobs" / job.id / layout.WORKER_LOG_FILE
    assert "worker started" in worker_log.read_text(), "the worker logs to the job's folder, as locally"
    final = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.result.steps == 4
    assert (running.data_dir / final.result.adapter_location / "adapter_model.safetensors").is_file()
    wait_until_gone(job.id)


def test_cancel_stops_the_worker_then_the_actor_is_gone(
    ray_jobs: tuple[RunningServer, pb_grpc.FineTuneServiceStub], tiny_model_dir: Path
) -> None:
    running, stub = ray_jobs
    stream = stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=100000, save_steps=0)))
    job = next(stream).job
    until(stream, "progress")
    assert not actor_gone(job.id), "the attempt's actor is named after its job"
    stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10)
    rest = [m.event for m in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=60)]
    assert states_of(rest)[-1] == pb.JOB_STATE_CANCELLED
    stream.cancel()
    worker_log = (running.data_dir / "jobs" / job.id / layout.WORKER_LOG_FILE).read_text()
    assert "cancel requested" in worker_log and "training cancelled" in worker_log, "the worker stopped itself"
    wait_until_gone(job.id)


def test_a_killed_actor_is_a_crash_and_the_job_resumes_from_its_checkpoint(
    ray_jobs: tuple[RunningServer, pb_grpc.FineTuneServiceStub], tiny_model_dir: Path
) -> None:
    _, stub = ray_jobs
    steps = 12
    stream = stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=steps, save_steps=4)))
    job = next(stream).job
    until(stream, "checkpoint")
    ray.kill(ray.get_actor(job.id, namespace=NAMESPACE), no_restart=True)
    stream.cancel()
    events = [m.event for m in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=300)]
    final = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
    assert_gap_free(events)
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.result.steps == steps
    assert final.resume_count >= 1
    lines = log_lines(events)
    assert any("the worker died (its Ray actor died" in line for line in lines), lines
    assert any(line.startswith("resumed from the checkpoint at step ") for line in lines), lines
    progress = [e.progress for e in events if e.WhichOneof("kind") == "progress"]
    assert progress[-1].step == steps and all(p.total_steps == steps for p in progress)


def test_a_job_waiting_for_the_cluster_says_so_and_can_be_cancelled(
    ray_jobs: tuple[RunningServer, pb_grpc.FineTuneServiceStub], tiny_model_dir: Path
) -> None:
    _, stub = ray_jobs

    @ray.remote(num_cpus=HEAD_CPUS)
    class Hog:  # every CPU of the cluster
        def ready(self) -> bool:
            return True

    hog = Hog.remote()  # type: ignore[attr-defined]
    try:
        ray.get(hog.ready.remote(), timeout=60)
        stream = stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name)), timeout=120)
        job = next(stream).job
        waiting = until(stream, "log", "waiting for the Ray cluster to place this job")
        assert "it needs 0 GPUs and 1 CPU on one node" in waiting.log.message
        stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10)
        rest = [m.event for m in stream]
        assert states_of(rest)[-1] == pb.JOB_STATE_CANCELLED
        assert "progress" not in kinds(rest)
        wait_until_gone(job.id)
    finally:
        ray.kill(hog)


def test_a_job_needing_more_gpus_than_any_node_has_cannot_fit(
    tmp_path: Path, server_roots: tuple[Path, Path], ray_head: RayHead, tiny_model_dir: Path
) -> None:
    running = ray_server(tmp_path, server_roots, ray_head, "--ray-gpus-per-job", "1")
    channel, stub = running.stub()
    try:
        config = job_config(tiny_model_dir.name)
        code, violations, report, _ = rejected(stub, config)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert [v.reason for v in report.violations] == ["DOES_NOT_FIT_CLUSTER"]
        assert "asks for 1 GPU and 1 CPU on one node" in report.violations[0].message
        assert "the largest has 0 GPUs and 3 CPUs" in report.violations[0].message, violations
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.Train(pb.TrainRequest(config=config), timeout=30))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no node of this Ray cluster has that much" in (refused.value.details() or "")
        listed = stub.ListJobs(pb.ListJobsRequest(), timeout=10)
        assert not listed.jobs, "nothing was queued"
    finally:
        channel.close()
        stop_server(running)


def test_a_dead_server_takes_its_actors_and_their_workers_with_it(
    tmp_path: Path, server_roots: tuple[Path, Path], ray_head: RayHead, tiny_model_dir: Path
) -> None:
    running = ray_server(tmp_path, server_roots, ray_head)
    channel, stub = running.stub()
    try:
        stream = stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=100000, save_steps=0)))
        job = next(stream).job
        until(stream, "progress")
        running.process.kill()  # kill -9: nothing of the server gets to clean up
        running.process.wait(timeout=30)
    finally:
        channel.close()
    wait_until_gone(job.id)  # the actor was owned by the server's Ray driver
    worker = next(
        json.loads(line)
        for line in (running.data_dir / "jobs" / job.id / layout.WORKER_LOG_FILE).read_text().splitlines()
        if '"worker started"' in line
    )
    deadline = time.monotonic() + ORPHAN_EXIT_S + GONE_TIMEOUT_S
    while alive(worker["pid"]):
        assert time.monotonic() < deadline, "the worker of a dead server's actor is still running"
        time.sleep(0.2)  # polling the process table, under a deadline


def test_two_servers_on_one_store_and_cluster_the_survivor_resumes_a_killed_servers_job(
    tmp_path: Path,
    server_roots: tuple[Path, Path],
    ray_head: RayHead,
    postgres_cluster: PostgresCluster,
    tiny_model_dir: Path,
) -> None:
    """kill -9 of the server whose actor trains a job: the actor dies with its owner, the lease expires, and the
    other server resumes the job in an actor of its own, to the planned steps with an unbroken sequence."""
    url, data_dir, steps = postgres_cluster.new_database(), tmp_path / "shared-data", 40
    flags = ("--store", url, "--lease-seconds", str(LEASE_SECONDS))
    servers = []
    for name in ("server-a", "server-b"):
        (tmp_path / name).mkdir()
        servers.append(ray_server(tmp_path / name, server_roots, ray_head, *flags, data_dir=data_dir))
    try:
        channel, stub = servers[0].stub()
        with channel:
            config = job_config(tiny_model_dir.name, max_steps=steps, save_steps=5, logging_steps=5)
            stream = stub.Train(pb.TrainRequest(config=config), timeout=300)
            job = next(stream).job
            until(stream, "checkpoint")

            def started_on(server: RunningServer) -> bool:
                return any(r.get("job_id") == job.id for r in logged(server, "ray.attempt_started"))

            [owner] = [s for s in servers if started_on(s)]
            [survivor] = [s for s in servers if s is not owner]
            owner.process.kill()  # kill -9: its Ray driver goes, and the actors it owns with it
            owner.process.wait(timeout=30)
        channel, survivor_stub = survivor.stub()
        with channel:
            events = [m.event for m in survivor_stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=300)]
            final = survivor_stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
        wait_for(lambda: actor_gone(job.id), "the resumed attempt's actor is gone", timeout=GONE_TIMEOUT_S)
    finally:
        for server in servers:
            stop_server(server)
    assert_resumed_elsewhere(events, final, steps)
    assert started_on(survivor), "the survivor ran the resumed attempt in its own actor"


def test_two_ray_train_workers_follow_one_process_with_double_accumulation(
    tmp_path: Path, server_roots: tuple[Path, Path], ray_head: RayHead, server: RunningServer, tiny_model_dir: Path
) -> None:
    """The trajectory check of tests/unit/test_ddp.py, through servers: 2 Ray Train workers over gloo vs 1 local
    worker accumulating 2 micro-batches, the same data and tolerance."""
    facts(server_roots[1] / "ddp-facts.jsonl")
    fields = {**DDP_COMMON, "dataset": "ddp-facts.jsonl"}
    running = ray_server(tmp_path, server_roots, ray_head, "--ray-workers-per-job", "2")
    channel, stub = running.stub()
    try:
        job, two = train_to_end(stub, job_config(tiny_model_dir.name, **fields, gradient_accumulation_steps=1))
    finally:
        channel.close()
        stop_server(running)
    local_channel, local_stub = server.stub()
    try:
        _, one = train_to_end(local_stub, job_config(tiny_model_dir.name, **fields, gradient_accumulation_steps=2))
    finally:
        local_channel.close()
    assert states_of(two)[-1] == pb.JOB_STATE_SUCCEEDED, log_lines(two)
    assert any(line.startswith("the attempt runs on 2 Ray Train workers") for line in log_lines(two))
    worker_log = (running.data_dir / "jobs" / job.id / layout.WORKER_LOG_FILE).read_text().splitlines()
    started = [json.loads(line)["rank"] for line in worker_log if '"worker started"' in line]
    assert sorted(started) == [0, 1], "both ranks log into the job's worker log, each line once"
    progress = [[e.progress for e in run if e.WhichOneof("kind") == "progress"] for run in (one, two)]
    assert [p.step for p in progress[1]] == [1, 2, 3, 4]
    for a, b in zip(*progress, strict=True):
        assert a.step == b.step and a.tokens_seen == b.tokens_seen
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
    evals = [[e.eval for e in run if e.WhichOneof("kind") == "eval"] for run in (one, two)]
    assert [e.step for e in evals[1]] == [2, 4]
    for a, b in zip(*evals, strict=True):
        assert b.eval_loss == pytest.approx(a.eval_loss, rel=1e-5)
    wait_until_gone(job.id)


def serve_fails(tmp: Path, roots: tuple[Path, Path], *flags: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "finetune_server.cli.main", "serve", "--port", "0", "--data-dir", str(tmp / "data"),
        "--model-dir", str(roots[0]), "--dataset-dir", str(roots[1]), "--executor", "ray", *flags,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_an_unreachable_ray_address_stops_the_start_with_one_line(
    tmp_path: Path, server_roots: tuple[Path, Path]
) -> None:
    with socket.socket() as probe:  # a port nobody listens on: bound a moment ago, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    finished = serve_fails(tmp_path, server_roots, "--ray-address", f"127.0.0.1:{port}")
    assert finished.returncode == 2
    errors = [line for line in finished.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused"], finished.stderr
    assert "Traceback" not in finished.stderr and not finished.stdout


def test_a_data_dir_a_node_cannot_see_is_refused(
    tmp_path: Path, server_roots: tuple[Path, Path], ray_head: RayHead
) -> None:
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    # A node in its own mount namespace, where `hidden` is an empty tmpfs: it cannot see the data dir below it.
    mount = f'mount -t tmpfs none {hidden} && exec "$0" "$@"'
    node = start_worker_node(ray_head, 0, wrapper=["unshare", "-m", "--propagation", "private", "sh", "-c", mount])
    try:
        finished = serve_fails(hidden, server_roots, "--ray-address", ray_head.address, "--ray-namespace", NAMESPACE)
    finally:
        node.stop()
    assert finished.returncode == 2, finished.stderr
    errors = [line for line in finished.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot see the data dir" in errors[0], finished.stderr
    assert str((hidden / "data").resolve()) in errors[0] and "mount it at the same path" in errors[0]
