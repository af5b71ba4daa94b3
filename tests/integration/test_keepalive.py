"""Keepalive on both sides, through a proxy that makes a connection die silently (see blackhole_proxy).

A WatchJob on a queued job carries nothing for as long as the job waits. Without pings a connection that a load
balancer dropped without a FIN would leave it waiting forever; with them the client notices, reconnects from the last
event it saw, and gets every event exactly once. The server permits the client's pings (gRPC's default would answer
them with GOAWAY too_many_pings) and pings silent connections itself. Timings are shortened to a second.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from finetune_client import GrpcFineTuneService
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb

from .blackhole_proxy import BlackholeProxy
from .conftest import RunningServer, start_server, stop_server
from .test_cli import popen_cli
from .test_jobs import assert_gap_free, job_config, states_of

KEEPALIVE_S = 1.0
KEEPALIVE_TIMEOUT_S = 2.0  # room for a busy machine to answer a ping
IDLE_DROP_S = 0.4  # below the ping interval, so a blackholed connection is found by the next ping
PINGS = 5  # gRPC's default policy would have sent GOAWAY by the 4th ping this fast


@pytest.fixture(scope="module")
def keepalive_server(
    tmp_path_factory: pytest.TempPathFactory, server_roots: tuple[Path, Path]
) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("keepalive-server"), *server_roots,
        "--keepalive-time", str(KEEPALIVE_S), "--keepalive-timeout", str(KEEPALIVE_TIMEOUT_S),
        "--keepalive-min-ping-interval", str(KEEPALIVE_S / 2),
    )  # fmt: skip
    yield running
    stop_server(running)


def test_the_server_pings_an_idle_connection_itself(keepalive_server: RunningServer) -> None:
    with (
        BlackholeProxy(keepalive_server.address, idle_s=IDLE_DROP_S) as proxy,
        grpc.insecure_channel(proxy.address) as channel,  # a channel without keepalive of its own
    ):
        grpc.channel_ready_future(channel).result(timeout=10)
        proxy.wait_for(lambda: proxy.connections[0].up.ping_acks >= 3, 30, "three pings from the server, answered")
        assert proxy.connections[0].down.pings >= 3 and proxy.connections[0].up.pings == 0


@pytest.mark.slow
def test_a_watch_of_a_queued_job_survives_a_connection_that_dies_silently(
    keepalive_server: RunningServer, tiny_model_dir: Path
) -> None:
    channel, stub = keepalive_server.stub()
    blocker_stream = stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=100000, save_steps=0)))
    blocker = next(blocker_stream).job  # holds the one slot
    queued = next(stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=2)))).job
    received: list[pb.JobEvent] = []
    failures: list[BaseException] = []
    with (
        BlackholeProxy(keepalive_server.address, idle_s=IDLE_DROP_S, max_drops=1) as proxy,
        GrpcFineTuneService(
            proxy.address, keepalive_time=KEEPALIVE_S, keepalive_timeout=KEEPALIVE_TIMEOUT_S, initial_backoff=0.05
        ) as client,
    ):

        def watch() -> None:
            try:
                received.extend(client.watch(queued.id))
            except BaseException as exc:  # the assertion below reports it
                failures.append(exc)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            # The watch idles on one connection: the client pings, the server answers and lets it (no GOAWAY).
            first = lambda: proxy.connections[0]  # noqa: E731 - read under the proxy's lock
            proxy.wait_for(lambda: bool(proxy.connections) and first().down.ping_acks >= PINGS, 30, "acked pings")
            assert first().up.pings >= PINGS and first().down.goaways == 0 and len(proxy.connections) == 1

            # The path dies without a word: the next ping goes unanswered, the client reconnects and watches again.
            proxy.arm()
            proxy.wait_for(
                lambda: proxy.drops == 1 and len(proxy.connections) == 2 and proxy.connections[1].up.headers >= 1,
                30,
                "a reconnect after the blackhole",
            )
            stub.CancelJob(pb.CancelJobRequest(job_id=blocker.id), timeout=10)  # the queued job runs now
            watcher.join(timeout=300)
        finally:
            client.close()  # ends a watch that a failed check above left waiting
            watcher.join(timeout=30)
    blocker_stream.cancel()
    assert not watcher.is_alive() and not failures, failures
    everything = [m.event for m in stub.WatchJob(pb.WatchJobRequest(job_id=queued.id), timeout=30)]
    channel.close()
    assert received == everything, "every event once: none lost with the dead connection, none repeated"
    assert_gap_free(received)
    assert states_of(received) == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED]
    assert len(proxy.connections) == 2, "one reconnect"


def test_the_command_line_pings_a_silent_watch(keepalive_server: RunningServer, tiny_model_dir: Path) -> None:
    channel, stub = keepalive_server.stub()
    long_run = job_config(tiny_model_dir.name, max_steps=100000, save_steps=0)
    blocker_stream = stub.Train(pb.TrainRequest(config=long_run))
    jobs = [next(blocker_stream).job, next(stub.Train(pb.TrainRequest(config=long_run))).job]
    with BlackholeProxy(keepalive_server.address, idle_s=IDLE_DROP_S) as proxy:
        watcher = popen_cli(proxy.address, "watch", jobs[1].id, "--keepalive", str(KEEPALIVE_S))
        try:
            proxy.wait_for(lambda: bool(proxy.connections) and proxy.connections[0].down.ping_acks >= 3, 60, "pings")
            assert proxy.connections[0].down.goaways == 0
        finally:
            watcher.send_signal(signal.SIGINT)  # detaches; the job stays queued
            watcher.communicate(timeout=30)
    for job in reversed(jobs):
        stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10)
    blocker_stream.cancel()
    channel.close()
