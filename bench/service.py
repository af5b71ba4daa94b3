"""Service overhead: the same training through `Train` over gRPC vs the engine in-process, and 100 watchers vs 1.

Four ways to train the same job, alternated (the order rotates each repetition):
- `grpc_1`: Train over gRPC; its own stream is the one watcher, reading every event. The server forks the job's
  worker from its warm pool (torch + transformers + peft imported already) and it trains.
- `grpc_100`: the same plus 99 WatchJob streams from sequence 0; each must receive the identical event sequence.
- `fresh`: a fresh Python process that imports the engine and calls run_training (a user's script), spawn to exit.
- `warm`: run_training in a process that has already imported everything (no import cost at all).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    REPO,
    ModelSize,
    Section,
    Target,
    build_model,
    child_env,
    judge,
    median,
    ratio,
    run_async,
    write_dataset,
    write_json,
)
from bench.server_proc import start_server
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.host.cpu_policy import worker_threads

MODES = ("grpc_1", "grpc_100", "fresh", "warm")


def training_fields(size: ModelSize, model: str, dataset: str) -> dict[str, Any]:
    """TrainingConfig fields (the domain dataclass and the proto share the names)."""
    return {
        "model_name": model,
        "dataset": dataset,
        "max_length": size.max_length,
        "num_train_epochs": 1.0,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "per_device_train_batch_size": size.batch_size,
        "save_steps": 0,
        "logging_steps": 1,
        "seed": 42,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
    }


def proto_config(fields: dict[str, Any]) -> pb.TrainingConfig:
    config = pb.TrainingConfig(**{k: v for k, v in fields.items() if k != "lora"})
    for key, value in fields["lora"].items():
        setattr(config.lora, key, value)
    return config


async def _watch(stub: pb_grpc.FineTuneServiceStub, job_id: str) -> list[int]:
    return [m.event.sequence async for m in stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_sequence=0))]


async def train_grpc(address: str, config: pb.TrainingConfig, watchers: int) -> dict[str, Any]:
    """Train once; `watchers` - 1 WatchJob streams join right after the job exists."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.FineTuneServiceStub(channel)
        t0 = time.perf_counter()
        call = stub.Train(pb.TrainRequest(config=config), timeout=1800)
        first = await call.read()
        job_id = first.job.id
        extra = [asyncio.create_task(_watch(stub, job_id)) for _ in range(watchers - 1)]
        events: list[pb.JobEvent] = []
        seen: dict[str, float] = {}
        while (message := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            event = message.event
            events.append(event)
            kind = event.WhichOneof("kind")
            if kind == "progress" and "first_progress" not in seen:
                seen["first_progress"] = time.perf_counter() - t0
        wall = time.perf_counter() - t0
        watched = await asyncio.gather(*extra)
        all_watchers_s = time.perf_counter() - t0
    sequences = [e.sequence for e in events]
    final = events[-1].state_change.current if events else 0
    if final != pb.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"job {job_id} ended in state {pb.JobState.Name(final)}")
    complete = all(w == sequences for w in watched)
    results = [e.result for e in events if e.WhichOneof("kind") == "result"]
    return {
        "wall_s": wall,
        "all_watchers_done_s": all_watchers_s,
        "first_progress_s": seen.get("first_progress", float("nan")),
        "train_runtime_s": results[0].train_runtime.ToTimedelta().total_seconds() if results else float("nan"),
        "steps": results[0].steps if results else 0,
        "tokens": results[0].trained_tokens if results else 0,
        "final_loss": results[0].final_train_loss if results else float("nan"),
        "events": len(events),
        "watchers": watchers,
        "watchers_complete": complete,
    }


class WarmEngine:
    """A child process with the engine imported; each `run()` trains once in it."""

    def __init__(self, spec_path: Path, out: Path, threads: int) -> None:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.service_runs",
                "--spec",
                str(spec_path),
                "--mode",
                "serve",
                "--out",
                str(out),
            ],
            cwd=REPO,
            env=child_env(threads),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=out.with_suffix(".log").open("w"),
            text=True,
        )
        self.import_s = float(self._read()["import_s"])

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the warm engine exited with {self._proc.wait()}")
        return dict(json.loads(line))

    def run(self) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write("run\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=60)


def run_fresh(spec_path: Path, out: Path, threads: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with out.with_suffix(".log").open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.service_runs", "--spec", str(spec_path), "--mode", "once", "--out", str(out)],
            cwd=REPO,
            env=child_env(threads),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=1800,
            check=False,
        )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"fresh engine run failed ({proc.returncode}); see {out.with_suffix('.log')}")
    result = dict(json.loads(out.read_text()))
    result["engine_wall_s"] = result["wall_s"]
    result["wall_s"] = wall  # spawn to exit, as a user's script
    return result


def run(
    *, size: ModelSize, work_dir: Path, reps: int, watchers: int = 100, warm_up: bool = True, threads: int = 0
) -> Section:
    """`threads` torch threads in the worker and in the in-process runs alike (0: the server's default for a
    worker), so the ratios are what the service adds, not a difference in thread count."""
    section = Section("service")
    threads = worker_threads(threads, [], slots=1)
    t0 = time.perf_counter()
    model_dir = build_model(size, work_dir)
    dataset_root = work_dir / "datasets"
    dataset = write_dataset(dataset_root / f"service-{size.name}.jsonl", size.samples, size.max_length)
    fields = training_fields(size, model_dir.name, dataset.name)
    spec_path = work_dir / "service" / "spec.json"
    spec = {
        "config": {**fields, "model_name": str(model_dir), "dataset": str(dataset)},
        "model_dir": str(model_dir),
        "dataset": str(dataset),
        "work_dir": str(work_dir / "runs"),
    }
    write_json(spec_path, spec)
    server = start_server(
        work_dir / "service" / f"server-{time.time_ns()}",
        model_dir.parent,
        dataset_root,
        "--worker-threads",
        str(threads),
    )
    warm = WarmEngine(spec_path, work_dir / "service" / "warm.json", threads)
    runs: list[dict[str, Any]] = []
    try:
        config = proto_config(fields)
        if warm_up:  # untimed: first-job costs (store, page cache) and first-call costs in the warm process
            run_async(train_grpc(server.address, config, 1))
            warm.run()
        for rep in range(reps):
            order = MODES[rep % len(MODES) :] + MODES[: rep % len(MODES)]
            for mode in order:
                if mode == "grpc_1":
                    result = run_async(train_grpc(server.address, config, 1))
                elif mode == "grpc_100":
                    result = run_async(train_grpc(server.address, config, watchers))
                elif mode == "fresh":
                    result = run_fresh(spec_path, work_dir / "service" / f"fresh-{rep}.json", threads)
                else:
                    result = warm.run()
                result.update(mode=mode, rep=rep)
                runs.append(result)
    finally:
        warm.close()
        server.stop()

    def med(mode: str, key: str) -> float:
        return median([float(r[key]) for r in runs if r["mode"] == mode])

    def per_rep(num: str, den: str, key: str = "wall_s") -> float:
        values = []
        for rep in range(reps):
            a = next(r for r in runs if r["mode"] == num and r["rep"] == rep)
            b = next(r for r in runs if r["mode"] == den and r["rep"] == rep)
            values.append(ratio(float(a[key]), float(b[key])))
        return median(values)

    import_s = med("fresh", "import_s")
    ratios = {
        "grpc_1 (worker from the warm pool) / warm in-process": per_rep("grpc_1", "warm"),
        "grpc_1 / fresh script (which pays the import)": per_rep("grpc_1", "fresh"),
        "training loop in the worker / warm in-process loop": per_rep("grpc_1", "warm", key="train_runtime_s"),
        f"grpc with {watchers} watchers / 1 watcher (wall)": per_rep("grpc_100", "grpc_1"),
        f"grpc with {watchers} watchers / 1 watcher (training loop)": per_rep(
            "grpc_100", "grpc_1", key="train_runtime_s"
        ),
    }
    warm_ratio = ratios["grpc_1 (worker from the warm pool) / warm in-process"]
    fresh_ratio = ratios["grpc_1 / fresh script (which pays the import)"]
    slow = ratios[f"grpc with {watchers} watchers / 1 watcher (wall)"] - 1
    section.targets += [
        Target("service: gRPC (warm pool) / warm in-process wall", warm_ratio, "<= 1.05x", _le(warm_ratio, 1.05)),
        Target("service: gRPC / fresh-process script wall", fresh_ratio, "<= 1.05x", _le(fresh_ratio, 1.05)),
        Target(f"service: slowdown with {watchers} watchers vs 1", slow, "<= 3%", _le(slow, 0.03), "%"),
        Target(
            f"service: all {watchers} watchers got every event",
            float(all(r["watchers_complete"] for r in runs if r["mode"] == "grpc_100")),
            "true",
            all(r["watchers_complete"] for r in runs if r["mode"] == "grpc_100"),
            "",
        ),
    ]
    section.data = {
        "model": size.name,
        "samples": size.samples,
        "batch_size": size.batch_size,
        "max_length": size.max_length,
        "repetitions": reps,
        "watchers": watchers,
        "threads": threads,
        "worker_import_s": import_s,
        "warm_process_import_s": warm.import_s,
        "medians": {
            mode: {
                k: med(mode, k)
                for k in ("wall_s", "train_runtime_s", "events")
                if any(k in r for r in runs if r["mode"] == mode)
            }
            for mode in MODES
        },
        "ratios": ratios,
        "runs": runs,
    }
    section.wall_s = time.perf_counter() - t0
    return section


def _le(value: float, limit: float) -> bool | None:
    return judge(value, value <= limit)
