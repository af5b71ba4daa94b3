"""RPC latency: ValidateConfig and GetJob at 1, 10 and 50 concurrent clients against a local server (loopback only).

Each client has its own channel and sends its next request when the previous one answers (closed loop). A level ends
after `max_requests` answers or `max_seconds`, whichever comes first; a short untimed warm-up connects every channel.
The load generator is one asyncio thread in this process, on the same cores as the server: its own cost is part of
what is measured, so these numbers are upper bounds for a remote client.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench.common import ModelSize, Section, Target, build_model, judge, median, percentile, run_async, write_dataset
from bench.server_proc import start_server
from bench.service import proto_config, training_fields
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc

LEVELS = (1, 10, 50)


async def _level(
    address: str,
    clients: int,
    call: Callable[[pb_grpc.FineTuneServiceStub], Any],
    max_requests: int,
    max_s: float,
    server_pid: int,
) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(address) for _ in range(clients)]
    stubs = [pb_grpc.FineTuneServiceStub(c) for c in channels]
    try:
        await asyncio.gather(*(call(s) for s in stubs for _ in range(2)))  # warm-up: connect, first-call costs
        latencies: list[float] = []
        errors = 0
        issued = 0
        deadline = time.perf_counter() + max_s

        async def client(stub: pb_grpc.FineTuneServiceStub) -> None:
            nonlocal issued, errors
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                try:
                    await call(stub)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        server = psutil.Process(server_pid)
        server_cpu0, client_cpu0 = _cpu_s(server), time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(s) for s in stubs))
        elapsed = time.perf_counter() - t0
        server_cpu, client_cpu = _cpu_s(server) - server_cpu0, time.process_time() - client_cpu0
    finally:
        await asyncio.gather(*(c.close(None) for c in channels))
    ms = [x * 1000 for x in latencies]
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed if elapsed > 0 else float("nan"),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
        "mean_ms": sum(ms) / len(ms) if ms else float("nan"),
        # CPU per answer: what the cores spend, server and load generator apart (they share the machine's cores)
        "server_cpu_ms": server_cpu * 1000 / len(ms) if ms else float("nan"),
        "client_cpu_ms": client_cpu * 1000 / len(ms) if ms else float("nan"),
    }


def _closed_loop_limit(table: dict[str, list[dict[str, Any]]], clients: int, *, target_ms: float) -> dict[str, Any]:
    """What bounds the latency at `clients` closed-loop clients on this machine: their mean latency is clients /
    throughput (Little's law), and the throughput is at most the cores over the CPU that one answer costs, and at
    most one core's worth of the server's share (one process: its Python work holds one interpreter lock)."""
    cores = len(os.sched_getaffinity(0))
    out: dict[str, Any] = {"clients": clients, "target_ms": target_ms, "cores": cores}
    out["answers_per_s_needed"] = clients / (target_ms / 1000)
    for rpc_name, rows in table.items():
        row = next(r for r in rows if r["clients"] == clients)
        cpu_ms = row["server_cpu_ms"] + row["client_cpu_ms"]
        out[rpc_name] = {
            "server_cpu_ms": row["server_cpu_ms"],
            "client_cpu_ms": row["client_cpu_ms"],
            "answers_per_s_possible": min(cores * 1000 / cpu_ms, 1000 / row["server_cpu_ms"])
            if row["server_cpu_ms"] > 0
            else float("nan"),
            "mean_ms": row["mean_ms"],
        }
    return out


def _cpu_s(process: psutil.Process) -> float:
    """CPU seconds of the process and its threads so far (a server's workers are not counted: none runs here)."""
    times = process.cpu_times()
    return times.user + times.system


async def _finished_job(address: str, config: pb.TrainingConfig) -> str:
    """A job that has ended (one optimizer step), for GetJob to read."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.FineTuneServiceStub(channel)
        job_id = ""
        async for message in stub.Train(pb.TrainRequest(config=config), timeout=600):
            if message.WhichOneof("kind") == "job":
                job_id = message.job.id
        return job_id


async def _measure(
    address: str, config: pb.TrainingConfig, levels: Sequence[int], max_requests: int, max_s: float, server_pid: int
) -> dict[str, list[dict[str, Any]]]:
    validate_request = pb.ValidateConfigRequest(config=config)

    async def validate(stub: pb_grpc.FineTuneServiceStub) -> None:
        response = await stub.ValidateConfig(validate_request, timeout=30)
        if not response.valid:
            raise RuntimeError(f"the benchmark config is invalid: {response}")

    out: dict[str, list[dict[str, Any]]] = {"ValidateConfig": [], "GetJob": []}
    for clients in levels:
        out["ValidateConfig"].append(await _level(address, clients, validate, max_requests, max_s, server_pid))
    one_step = pb.TrainingConfig()
    one_step.CopyFrom(config)
    one_step.max_steps = 1
    job_id = await _finished_job(address, one_step)
    get_request = pb.GetJobRequest(job_id=job_id)

    async def get_job(stub: pb_grpc.FineTuneServiceStub) -> None:
        await stub.GetJob(get_request, timeout=30)

    for clients in levels:
        out["GetJob"].append(await _level(address, clients, get_job, max_requests, max_s, server_pid))
    return out


def run(
    *,
    size: ModelSize,
    work_dir: Path,
    levels: Sequence[int] = LEVELS,
    max_requests: int = 3000,
    max_seconds: float = 6.0,
    reps: int = 1,
) -> Section:
    section = Section("rpc")
    t0 = time.perf_counter()
    model_dir = build_model(size, work_dir)
    dataset_root = work_dir / "datasets"
    dataset = write_dataset(dataset_root / f"rpc-{size.name}.jsonl", size.samples, size.max_length)
    config = proto_config(training_fields(size, model_dir.name, dataset.name))
    # No prewarm: the warm pool's ~10 s of imports at start would share the cores with the first levels measured
    # (p50 at 1 client 7-8 ms with it against 4.3-4.8 ms without). Its fork server starts with the one-step job,
    # which ends before GetJob is measured.
    server = start_server(
        work_dir / "rpc" / f"server-{time.time_ns()}", model_dir.parent, dataset_root, "--no-prewarm-workers"
    )
    try:
        measured = [
            run_async(_measure(server.address, config, levels, max_requests, max_seconds, server.process.pid))
            for _ in range(reps)
        ]
    finally:
        server.stop()
    table: dict[str, list[dict[str, Any]]] = {}
    for rpc_name in ("ValidateConfig", "GetJob"):
        table[rpc_name] = []
        for i, clients in enumerate(levels):
            rows = [m[rpc_name][i] for m in measured]
            merged = {k: median([float(r[k]) for r in rows]) for k in rows[0] if k != "clients"}
            table[rpc_name].append({"clients": clients, **merged})
    top = max(levels)
    p99 = next(r["p99_ms"] for r in table["ValidateConfig"] if r["clients"] == top)
    section.targets.append(
        Target(
            f"rpc: ValidateConfig p99 at {top} clients (local model)",
            p99,
            "<= 25 ms",
            judge(p99, p99 <= 25.0),
            "ms",
        )
    )
    section.data = {
        "model": size.name,
        "dataset_rows": size.samples,
        "limit": _closed_loop_limit(table, top, target_ms=25.0),
        "levels": list(levels),
        "max_requests_per_level": max_requests,
        "max_seconds_per_level": max_seconds,
        "repetitions": reps,
        "table": table,
    }
    section.wall_s = time.perf_counter() - t0
    return section
