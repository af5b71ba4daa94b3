"""Start-up: Train -> first training step through the service, with the warm worker pool and without it.

Two servers on the same model and data: one with its default warm pool (workers forked from a fork server that has
imported torch, transformers and peft), one with `--warm-workers 0` (every worker a fresh `python -m`). Each first
trains one untimed job (the page cache, the store, the pool's fork server ready), then the timed jobs alternate
between them. Measured per job: the time from the Train call to its first progress event, and to the job's end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import ModelSize, Section, Target, build_model, judge, median, ratio, run_async, write_dataset
from bench.server_proc import Server, start_server
from bench.service import proto_config, train_grpc, training_fields

MODES = ("pool", "fresh")
POOL_LIMIT_S = 2.0  # Train -> first step with the pool, on the tiny model
POOL_SPEEDUP = 4.0  # ... and at least this many times sooner than a fresh worker


def run(*, size: ModelSize, work_dir: Path, reps: int, warm_up: bool = True) -> Section:
    """`warm_up`: one untimed job per server first (off in the smoke run, which checks the plumbing only)."""
    section = Section("startup")
    t0 = time.perf_counter()
    model_dir = build_model(size, work_dir)
    dataset_root = work_dir / "datasets"
    dataset = write_dataset(dataset_root / f"startup-{size.name}.jsonl", size.samples, size.max_length)
    config = proto_config(training_fields(size, model_dir.name, dataset.name))
    folder = work_dir / "startup" / f"run-{time.time_ns()}"
    servers: dict[str, Server] = {}
    runs: list[dict[str, Any]] = []
    try:
        servers["pool"] = start_server(folder / "pool", model_dir.parent, dataset_root)
        servers["fresh"] = start_server(folder / "fresh", model_dir.parent, dataset_root, "--warm-workers", "0")
        for server in servers.values() if warm_up else ():  # untimed
            run_async(train_grpc(server.address, config, 1))
        for rep in range(reps):
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                result = run_async(train_grpc(servers[mode].address, config, 1))
                runs.append({"mode": mode, "rep": rep, **result})
    finally:
        for server in servers.values():
            server.stop()

    def med(mode: str, key: str) -> float:
        return median([float(r[key]) for r in runs if r["mode"] == mode])

    pool_first, fresh_first = med("pool", "first_progress_s"), med("fresh", "first_progress_s")
    speedup = ratio(fresh_first, pool_first)
    section.targets += [
        Target(
            "startup: Train -> first step with the warm pool",
            pool_first,
            f"<= {POOL_LIMIT_S:g} s",
            judge(pool_first, pool_first <= POOL_LIMIT_S),
            " s",
        ),
        Target(
            "startup: first step, fresh worker / warm pool",
            speedup,
            f">= {POOL_SPEEDUP:g}x",
            judge(speedup, speedup >= POOL_SPEEDUP),
        ),
    ]
    section.data = {
        "model": size.name,
        "samples": size.samples,
        "repetitions": reps,
        "medians": {mode: {k: med(mode, k) for k in ("first_progress_s", "wall_s")} for mode in MODES},
        "ratios": {
            "first step: fresh / pool": speedup,
            "whole job: fresh / pool": ratio(med("fresh", "wall_s"), med("pool", "wall_s")),
        },
        "runs": runs,
    }
    section.wall_s = time.perf_counter() - t0
    return section
