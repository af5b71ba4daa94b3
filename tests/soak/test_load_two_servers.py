"""Load on two servers sharing one PostgreSQL store and one data dir: 25 grpc.aio clients on each for 60 s call
ValidateConfig, GetJob, ListJobs and WatchJob (a replay, and the live job, which trains on one of the two) while a
job trains. No call may fail; p50/p99 latency per method and server."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from bench.common import percentile
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb

from ..integration.test_jobs import job_config, train_to_end
from ..postgres_cluster import PostgresCluster
from .conftest import machine, start_server, stop_server, write_report_section
from .test_load import DURATION_S, WATCH_LIVE, WATCH_REPLAY, Followed, LoadResult, run_load

pytestmark = [pytest.mark.soak, pytest.mark.timeout(1200)]

CLIENTS_PER_SERVER = int(os.environ.get("LOAD_CLIENTS_PER_SERVER", "25"))


def test_two_servers_with_25_clients_each_for_a_minute_while_a_job_trains(
    tmp_path: Path, server_roots: tuple[Path, Path], tiny_model_dir: Path, postgres_cluster: PostgresCluster
) -> None:
    load_at_start = os.getloadavg()[0]
    url = postgres_cluster.new_database()
    extra = ("--store", url)
    for name in "ab":
        (tmp_path / name).mkdir()
    servers = [start_server(tmp_path / name, *server_roots, *extra, data_dir=tmp_path / "data") for name in "ab"]
    channel, stub = servers[0].stub()
    try:
        finished, _ = train_to_end(stub, job_config(tiny_model_dir.name, max_steps=10))
        config = job_config(tiny_model_dir.name, max_steps=100_000, save_steps=0, logging_steps=5)
        live = Followed()
        live.follow(stub, config)
        assert live.training.wait(timeout=300) and live.error is None and live.job is not None
        live_id = live.job.id

        async def both() -> list[LoadResult]:
            return list(
                await asyncio.gather(
                    *(run_load(s.address, config, live_id, finished.id, CLIENTS_PER_SERVER) for s in servers)
                )
            )

        started = time.perf_counter()
        results = asyncio.run(both())
        window_s = time.perf_counter() - started
        stub.CancelJob(pb.CancelJobRequest(job_id=live_id), timeout=10)
    finally:
        channel.close()
        for server in servers:
            stop_server(server)

    errors = [e for r in results for e in r.errors]
    rows = "\n".join(
        f"| {name} | {label} | {len(values)} | {percentile(values, 50) * 1000:.1f} | "
        f"{percentile(values, 99) * 1000:.1f} | {max(values) * 1000:.1f} |"
        for label, r in zip("AB", results, strict=True)
        for name, values in sorted(r.latencies.items())
    )
    calls = sum(len(v) for r in results for v in r.latencies.values())
    write_report_section(
        "load-two-servers",
        f"""## Load on two servers, one PostgreSQL store: {CLIENTS_PER_SERVER} grpc.aio clients per server for \
{DURATION_S:.0f} s while a job trains (tests/soak/test_load_two_servers.py)

{machine(load_at_start)}. Loopback; both servers, PostgreSQL 15 (fsync off, a test cluster), the worker and the
clients share the CPUs. The live job trains on one server; half of its watchers are on the other.

| figure | value |
|---|---|
| calls | {calls} in {window_s:.1f} s ({calls / window_s:.0f}/s) |
| errors | {len(errors)} |

| method | server | calls | p50 (ms) | p99 (ms) | max (ms) |
|---|---|---|---|---|---|
{rows}
""",
    )
    assert errors == [], errors[:10]
    for r in results:
        assert set(r.latencies) == {"ValidateConfig", "GetJob", "ListJobs", WATCH_REPLAY, WATCH_LIVE}
