"""`python -m bench`: run the benchmarks and write results.json + results.md (default: bench/results/).

python -m bench                          # everything at the default sizes (~15 minutes on 2 cores)
python -m bench --quick                  # the smallest size, a few steps (the CI smoke run)
python -m bench --only engine,rpc        # a subset
python -m bench --sizes 4M --reps 5      # engine sizes and repetitions
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench import data, engine, memory, rpc, service, startup
from bench.common import (
    ALL_SIZES,
    DEFAULT_SIZES,
    DEFAULT_WORK_DIR,
    QUICK_SIZE,
    RESULTS_DIR,
    Section,
    close_children,
    fork_children,
    machine,
    versions,
    write_json,
)
from bench.report import render

BENCHMARKS = ("engine", "startup", "service", "rpc", "memory", "data")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="sage-finetune benchmarks with baselines.")
    parser.add_argument("--quick", action="store_true", help="smallest size, a few steps (smoke run)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help=f"engine model sizes, of {list(ALL_SIZES)}")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions (engine, service)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in the engine runs")
    parser.add_argument(
        "--service-threads", type=int, default=0, help="torch threads in the service runs (0: the server's default)"
    )
    parser.add_argument("--watchers", type=int, default=100, help="concurrent WatchJob streams in the service run")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="models, datasets, job folders")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the sections run in the out dir's results.json, keeping the others (each says when it ran)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    unknown_sizes = set(args.sizes.split(",")) - set(ALL_SIZES)
    if unknown_sizes:
        parser.error(f"unknown sizes: {', '.join(sorted(unknown_sizes))}")
    return args


def plan(args: argparse.Namespace) -> dict[str, Callable[[], Section]]:
    work = args.work_dir.resolve()
    quick = args.quick
    reps = 1 if quick else args.reps
    runners: dict[str, Callable[[], Section]] = {
        "engine": lambda: engine.run(
            sizes=engine.default_sizes(quick, args.sizes.split(",")),
            work_dir=work,
            reps=reps,
            threads=args.threads,
            methods=engine.QUICK_METHODS if quick else engine.DEFAULT_METHODS,
        ),
        "startup": lambda: startup.run(
            size=QUICK_SIZE if quick else ALL_SIZES["0.1M"], work_dir=work, reps=1 if quick else 5, warm_up=not quick
        ),
        "service": lambda: service.run(
            size=QUICK_SIZE if quick else dataclasses.replace(ALL_SIZES["0.1M"], samples=48, batch_size=4),
            work_dir=work,
            reps=reps,
            watchers=3 if quick else args.watchers,
            warm_up=not quick,
            threads=args.service_threads,
        ),
        "rpc": lambda: rpc.run(
            size=QUICK_SIZE if quick else ALL_SIZES["0.1M"],
            work_dir=work,
            levels=(1, 5) if quick else rpc.LEVELS,
            max_requests=20 if quick else 3000,
            max_seconds=0.5 if quick else 6.0,
        ),
        "memory": lambda: memory.run(cases=memory.QUICK_CASES if quick else memory.DEFAULT_CASES, work_dir=work),
        "data": lambda: data.run(work_dir=work, quick=quick, reps=reps),
    }
    return {name: runners[name] for name in BENCHMARKS if name in args.only.split(",")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results: dict = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "children": "forked from a warm fork server" if args.quick else "fresh processes",
        "argv": vars(args) | {"out_dir": str(args.out_dir), "work_dir": str(args.work_dir)},
        "versions": versions(),
        "machine": machine(),
        "sections": {},
        "wall_s": 0.0,
    }
    out_json, out_md = args.out_dir / "results.json", args.out_dir / "results.md"
    if args.merge and out_json.is_file():
        results = merge_base(json.loads(out_json.read_text()))
    if args.quick:  # the smoke run checks that every benchmark works, not what it measures: fork, don't import
        fork_children()
    try:
        failed = _run_all(args, results, started, out_json, out_md)
    finally:
        close_children()
    print(f"[bench] wrote {out_json} and {out_md} in {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if failed else 0


def merge_base(earlier: dict) -> dict:
    """The earlier results, to which a `--merge` run writes its sections, with each section's start time (from
    then on `_run_all` stamps the sections it runs)."""
    ran_at = earlier.get("section_started_at") or dict.fromkeys(earlier["sections"], earlier["started_at"])
    return earlier | {"section_started_at": dict(ran_at)}


def _run_all(args: argparse.Namespace, results: dict, started: float, out_json: Path, out_md: Path) -> bool:
    failed = False
    for name, runner in plan(args).items():
        print(f"[bench] {name} ...", flush=True)
        if "section_started_at" in results:  # a merged run: this section's own start
            results["section_started_at"][name] = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            section = runner()
        except Exception:  # one failed benchmark must not lose the others' results
            failed = True
            section = Section(name, error=traceback.format_exc())
            print(section.error, flush=True)
        results["sections"][name] = json.loads(json.dumps(dataclasses.asdict(section), default=str))  # plain data
        if "section_started_at" not in results:  # a merged run keeps the first run's total
            results["wall_s"] = time.perf_counter() - started
        write_json(out_json, results)  # after each benchmark: a long run that dies keeps what it measured
        out_md.write_text(render(results))
        print(f"[bench] {name} done in {section.wall_s:.0f} s", flush=True)
        for target in section.targets:
            met = {True: "met", False: "NOT met", None: "not measured"}[target.met]
            print(f"    {target.name}: {target.value:.3f} (target {target.target}) {met}", flush=True)
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
