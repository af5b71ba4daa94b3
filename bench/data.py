"""Datasets of any size: encoding throughput, worker memory and time to the first step at 300k rows vs 3k rows.

(a) Encoding into the token cache, in tokens/s, against a bare `tokenizer(batch_of_rendered_texts)` loop over the
    same rows with the same cores (and against `datasets.map(num_proc=P)` with our encoder, for reference): the
    median of per-repetition ratios, the ways alternating.
(b) A worker's peak RSS for 3 steps at 300k rows / at 3k rows (same model, cold cache: tokenizing included).
(c) Time from the training call to the first step at 300k / 3k rows, with a warm cache and a cold one.
Every measurement is a fresh child process (`data_runs.py`); the comparisons are ratios within this run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import ModelSize, Section, Target, build_model, judge, median, ratio, run_child, write_dataset
from finetune_server.host.cpu_policy import available_cpus, worker_threads

DEFAULT_ROWS = {"encode": 30_000, "small": 3_000, "big": 300_000}
QUICK_ROWS = {"encode": 2_000, "small": 300, "big": 3_000}
DATA_SIZE = ModelSize("data", 64, 128, 2, 4, 2, vocab_size=1024, max_length=256)  # the tokenizer is what matters


def run(*, work_dir: Path, quick: bool, reps: int = 3) -> Section:
    section = Section("data")
    t0 = time.perf_counter()
    rows = QUICK_ROWS if quick else DEFAULT_ROWS
    model_dir = build_model(DATA_SIZE, work_dir)
    folder = work_dir / "data"
    datasets = {name: _dataset(folder, n) for name, n in rows.items()}
    cores = len(available_cpus())
    encode = _encode(model_dir, datasets["encode"], folder, cores, 1 if quick else reps)
    threads = worker_threads(0, [], 1)  # what the server gives a worker here
    jobs = _jobs(model_dir, datasets, folder, threads)
    section.data = {
        "rows": rows,
        "cores": cores,
        "worker_threads": threads,
        "encode": encode,
        "jobs": jobs,
        "ratios": _ratios(encode, jobs),
    }
    section.targets = _targets(section.data["ratios"], _label(rows["big"]), _label(rows["small"]))
    section.wall_s = time.perf_counter() - t0
    return section


def _encode(model_dir: Path, dataset: Path, folder: Path, cores: int, reps: int) -> dict[str, Any]:
    args = ["encode", "--model-dir", str(model_dir), "--dataset", str(dataset), "--threads", str(cores)]
    result = run_child("bench.data_runs", [*args, "--reps", str(reps)], out=folder / "encode.json", timeout_s=3600)
    runs = result["runs"]
    medians = {way: {k: median([r[k] for r in rs]) for k in ("seconds", "tokens_per_s")} for way, rs in runs.items()}
    for way, rs in runs.items():
        medians[way].update(rows=rs[0]["rows"], tokens=rs[0]["tokens"])
    per_rep = [o["tokens_per_s"] / b["tokens_per_s"] for o, b in zip(runs["ours"], runs["bare"], strict=True)]
    over_map = [o["tokens_per_s"] / d["tokens_per_s"] for o, d in zip(runs["ours"], runs["datasets_map"], strict=True)]
    return {
        "runs": runs,
        "medians": medians,
        "ours_over_bare": median(per_rep),
        "ours_over_datasets_map": median(over_map),
    }


def _dataset(folder: Path, n: int) -> Path:
    path = folder / f"rows-{n}.jsonl"
    if not path.is_file():
        write_dataset(path, n, DATA_SIZE.max_length, seed=11)
    return path


def _jobs(model_dir: Path, datasets: dict[str, Path], folder: Path, threads: int) -> dict[str, Any]:
    """Each size twice on a fresh cache folder: cold (tokenizes), then warm (a hit)."""
    jobs: dict[str, Any] = {}
    for name in ("small", "big"):
        cache = folder / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        for state in ("cold", "warm"):
            args = ["train", "--model-dir", str(model_dir), "--dataset", str(datasets[name]), "--cache-dir", str(cache)]
            jobs[f"{name}_{state}"] = run_child(
                "bench.data_runs",
                [*args, "--threads", str(threads)],
                out=folder / f"train-{name}-{state}.json",
                timeout_s=1800,
            )
            if jobs[f"{name}_{state}"]["hit"] != (state == "warm"):
                raise RuntimeError(f"the {state} {name} run was not a {state} start: {jobs[f'{name}_{state}']}")
        shutil.rmtree(cache, ignore_errors=True)
    return jobs


def _ratios(encode: dict[str, Any], jobs: dict[str, Any]) -> dict[str, float]:
    big_cold_tokenizing = _build_seconds(jobs["big_cold"])
    return {
        "encode_ours_over_bare": encode["ours_over_bare"],
        "encode_ours_over_datasets_map": encode["ours_over_datasets_map"],
        "peak_rss_big_over_small": ratio(jobs["big_cold"]["peak_rss_bytes"], jobs["small_cold"]["peak_rss_bytes"]),
        "peak_rss_big_over_small_warm": ratio(jobs["big_warm"]["peak_rss_bytes"], jobs["small_warm"]["peak_rss_bytes"]),
        "first_step_warm_big_over_small": ratio(
            jobs["big_warm"]["to_first_step_s"], jobs["small_warm"]["to_first_step_s"]
        ),
        "first_step_cold_big_over_tokenizing_plus_small_cold": ratio(
            jobs["big_cold"]["to_first_step_s"], big_cold_tokenizing + jobs["small_cold"]["to_first_step_s"]
        ),
        "big_cold_tokenizing_s": big_cold_tokenizing,
    }


def _build_seconds(job: dict[str, Any]) -> float:
    """The seconds of the build the engine logged ("tokenized N examples into the token cache in X s ...")."""
    for line in job["cache"]:
        if line.startswith("tokenized ") and " in " in line:
            return float(line.split(" into the token cache in ", 1)[1].split(" s", 1)[0])
    return float("nan")


def _label(rows: int) -> str:
    return f"{rows // 1000}k" if rows >= 1000 else str(rows)


def _targets(r: dict[str, float], big: str, small: str) -> list[Target]:
    encode, rss = r["encode_ours_over_bare"], r["peak_rss_big_over_small"]
    warm, cold = r["first_step_warm_big_over_small"], r["first_step_cold_big_over_tokenizing_plus_small_cold"]
    return [
        Target(
            "data: encoding tokens/s, ours / bare tokenizer, same cores",
            encode,
            ">= 0.7x",
            judge(encode, encode >= 0.7),
        ),
        Target(f"data: worker peak RSS, {big} rows / {small} rows", rss, "<= 1.2x", judge(rss, rss <= 1.2)),
        Target(f"data: to first step, warm cache, {big} / {small}", warm, "<= 1.3x", judge(warm, warm <= 1.3)),
        Target(
            f"data: to first step, cold, {big} / (its tokenizing + {small} cold)",
            cold,
            "<= 1.0x",
            judge(cold, cold <= 1.0),
        ),
    ]
