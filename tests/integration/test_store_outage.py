"""A PostgreSQL job store lost while the server runs: health says NOT_SERVING and calls are UNAVAILABLE with a
RetryInfo; once the database is back, health says SERVING and the same calls work. A cluster of its own: it is
stopped here."""

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

from ..postgres_cluster import start_cluster
from .conftest import start_server, stop_server

DEADLINE_S = 60


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)  # polling health: the probe's interval is the server's


def test_health_follows_the_store_and_calls_are_unavailable_while_it_is_lost(
    tmp_path: Path, server_roots: tuple[Path, Path]
) -> None:
    cluster = start_cluster()
    server = None
    try:
        server = start_server(tmp_path, *server_roots, "--store", cluster.new_database(), "--no-prewarm-workers")
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.FineTuneServiceStub(channel)

            def status() -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status

            assert status() == health_pb2.HealthCheckResponse.SERVING
            assert list(stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs) == []

            cluster.pg_ctl("stop", "-m", "fast")
            wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, "health says NOT_SERVING")
            with pytest.raises(grpc.RpcError) as lost:
                stub.ListJobs(pb.ListJobsRequest(), timeout=30)
            error = from_rpc_error(lost.value)
            assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "STORE_UNAVAILABLE"
            assert error.retry_delay is not None and error.retry_delay > 0

            cluster.start()
            wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING, "health says SERVING again")
            assert list(stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs) == []
    finally:
        if server is not None:
            stop_server(server)
        cluster.stop()
