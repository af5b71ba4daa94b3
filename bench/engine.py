"""Engine throughput: our training loop against HF Trainer, TRL SFTTrainer and a bare loop, per model size.

Each size runs in one child process (`bench.engine_runs`) that alternates the methods; ratios are taken per
repetition (ours / baseline, non-padding tokens per second of the training call) and reported as medians.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    ALL_SIZES,
    DEFAULT_SIZES,
    QUICK_SIZE,
    ModelSize,
    Section,
    Target,
    build_model,
    count_parameters,
    judge,
    median,
    ratio,
    run_child,
    write_dataset,
)
from bench.engine_runs import DESCRIPTIONS

DEFAULT_METHODS = ("ours", "hf_padded", "hf_dynamic", "hf_grouped", "trl_packing", "trl_padding_free", "raw")
QUICK_METHODS = ("ours", "hf_padded", "hf_dynamic", "trl_packing", "trl_padding_free", "raw")
# (baseline methods, target ratio ours / best of them); "best" is the fastest baseline of the group in each repetition.
TARGETS = {
    "(a) HF padded to max_length": (("hf_padded",), 5.0),
    "(b) HF dynamic padding": (("hf_dynamic",), 2.0),
    "(c) best of TRL packing / padding-free": (("trl_packing", "trl_padding_free"), 1.5),
    "(d) bare loop (floor)": (("raw",), 0.95),
}
# The floor compares step loops (tokens_per_loop_s): the bare loop writes no final checkpoint, which ours does.
LOOP_RATIO = "(d) bare loop (floor)"


def run(
    *,
    sizes: Sequence[ModelSize],
    work_dir: Path,
    reps: int,
    threads: int,
    methods: Sequence[str] = DEFAULT_METHODS,
    learning_rate: float = 1e-3,
) -> Section:
    section = Section("engine")
    t0 = time.perf_counter()
    per_size: dict[str, Any] = {}
    for size in sizes:
        size_methods = size.methods or methods
        size_reps = min(reps, size.max_reps) if size.max_reps else reps
        model_dir = build_model(size, work_dir)
        dataset = write_dataset(work_dir / "datasets" / f"engine-{size.name}.jsonl", size.samples, size.max_length)
        child = run_child(
            "bench.engine_runs",
            [
                "--model-dir",
                str(model_dir),
                "--dataset",
                str(dataset),
                "--methods",
                ",".join(size_methods),
                "--reps",
                str(size_reps),
                "--batch-size",
                str(size.batch_size),
                "--max-length",
                str(size.max_length),
                "--learning-rate",
                str(learning_rate),
                "--threads",
                str(threads),
                "--work-dir",
                str(work_dir / "runs"),
            ],
            out=work_dir / "engine" / f"{size.name}.json",
            timeout_s=3600,
            threads=threads,
        )
        summary = summarize(child["runs"], size_methods)
        per_size[size.name] = {
            "parameters": count_parameters(model_dir),
            "model": "SmolLM2-135M-Instruct (pretrained, via scripts/real_model.py)" if size.real else "random Qwen2",
            "spec": size.spec_kwargs(),
            "repetitions": size_reps,
            "samples": size.samples,
            "batch_size": size.batch_size,
            "max_length": size.max_length,
            "torch_threads": child["torch_threads"],
            "examples": child["examples"],
            "lengths": child["lengths"],
            "methods": summary["methods"],
            "ratios": summary["ratios"],
            "cpu_ratios": summary["cpu_ratios"],
            "runs": child["runs"],
        }
        for label, (_, target) in TARGETS.items():
            value = summary["ratios"].get(label, float("nan"))
            section.targets.append(
                Target(
                    f"engine {size.name}: ours / {label} (tokens/s)",
                    value,
                    f">= {target}x",
                    judge(value, value >= target),
                )
            )
    section.data = {
        "descriptions": {m: DESCRIPTIONS[m] for m in dict.fromkeys([*methods, *(m for s in sizes for m in s.methods)])},
        "settings": {
            "lora": "r=8, alpha=16, dropout=0.05, all linear projections",
            "optimizer": f"torch AdamW lr={learning_rate}, constant schedule, no warmup, clip 1.0, weight decay 0",
            "precision": "fp32 on CPU (bf16 there is ~58x slower), sdpa attention",
            "epochs": 1,
            "repetitions": reps,
            "order": "methods alternate; the order rotates by one each repetition, after one untimed warm-up step each",
            "tokens_per_s": "non-padding tokens of the epoch / seconds of the training call alone; (d) over the step "
            "loops alone (loop s: first step to last; ours also writes a final checkpoint, which the bare loop does "
            "not, inside its train s)",
            "tokens_per_cpu_s": "the same tokens / CPU seconds of the process over the training (steadier on a shared "
            "machine: time spent waiting for a core is not counted)",
            "wall_s": "data preparation + model load + training (+ adapter save for ours), in a warm process",
            "final_loss": "last logged step's mean token loss; (a) also trains on prompt tokens, so its loss differs",
        },
        "sizes": per_size,
    }
    section.wall_s = time.perf_counter() - t0
    return section


def summarize(runs: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Medians per method, and per-repetition ratios of ours to each baseline group (median over repetitions)."""
    by_method: dict[str, list[dict[str, Any]]] = {m: [r for r in runs if r["method"] == m] for m in methods}
    out_methods: dict[str, dict[str, float]] = {}
    for method, rows in by_method.items():
        if not rows:
            continue
        out_methods[method] = {
            key: median([float(r[key]) for r in rows])
            for key in (
                "tokens_per_s",
                "tokens_per_cpu_s",
                "tokens_per_loop_s",
                "train_s",
                "loop_s",
                "train_cpu_s",
                "wall_s",
                "peak_rss_bytes",
                "rss_delta_bytes",
                "final_loss",
            )
            if key in rows[0]
        }
        out_methods[method]["steps"] = rows[0]["steps"]
        out_methods[method]["tokens"] = rows[0]["tokens"]
        if "peak_device_bytes" in rows[0]:
            out_methods[method]["peak_device_bytes"] = median([float(r["peak_device_bytes"]) for r in rows])
    reps = sorted({r["rep"] for r in runs})
    groups = {**{label: group for label, (group, _) in TARGETS.items()}}
    if "hf_grouped" in methods:
        groups["(b') HF dynamic padding grouped by length"] = ("hf_grouped",)

    def ratios_of(key: str) -> dict[str, float]:
        rate = {(r["method"], r["rep"]): float(r.get(key, float("nan"))) for r in runs}
        out: dict[str, float] = {}
        for label, group in groups.items():
            values = []
            for rep in reps:
                ours = rate.get(("ours", rep))
                base = [rate[(m, rep)] for m in group if (m, rep) in rate]
                if ours is not None and base:
                    values.append(ratio(ours, max(base)))
            out[label] = median(values)
        return out

    ratios = ratios_of("tokens_per_s")
    ratios[LOOP_RATIO] = ratios_of("tokens_per_loop_s")[LOOP_RATIO]
    return {"methods": out_methods, "ratios": ratios, "cpu_ratios": ratios_of("tokens_per_cpu_s")}


def default_sizes(quick: bool, names: Sequence[str] | None = None) -> list[ModelSize]:
    if quick:
        return [QUICK_SIZE]
    return [ALL_SIZES[n] for n in (names or DEFAULT_SIZES)]
