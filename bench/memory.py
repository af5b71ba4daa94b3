"""Memory estimate accuracy: `estimate_memory` against the measured peak RSS delta, one fresh process per config."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import QUICK_SIZE, SIZES, ModelSize, Section, Target, build_model, judge, median, run_child


@dataclass(frozen=True)
class MemoryCase:
    size: ModelSize
    batch: int
    seq: int
    checkpointing: bool = False
    steps: int = 2

    @property
    def label(self) -> str:
        return f"{self.size.name} b{self.batch} x {self.seq}{' +ckpt' if self.checkpointing else ''}"


DEFAULT_CASES = (
    MemoryCase(SIZES["0.1M"], 8, 512),
    MemoryCase(SIZES["4M"], 4, 256),
    MemoryCase(SIZES["4M"], 8, 512),
    MemoryCase(SIZES["4M"], 8, 512, checkpointing=True),
    MemoryCase(SIZES["30M"], 4, 256, steps=1),
)
QUICK_CASES = (MemoryCase(QUICK_SIZE, 2, 32, steps=1),)
TOLERANCE = 0.20


def run(*, cases: Sequence[MemoryCase], work_dir: Path) -> Section:
    section = Section("memory")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for i, case in enumerate(cases):
        model_dir = build_model(case.size, work_dir)
        args = [
            "--model-dir", str(model_dir), "--batch", str(case.batch), "--seq", str(case.seq),
            "--steps", str(case.steps),
        ]  # fmt: skip
        if case.checkpointing:
            args.append("--checkpointing")
        result = run_child("bench.memory_runs", args, out=work_dir / "memory" / f"case-{i}.json", timeout_s=900)
        result["case"] = case.label
        rows.append(result)
        value = float(result["measured_over_estimated"] or float("nan"))
        section.targets.append(
            Target(
                f"memory {case.label}: measured delta / estimate",
                value,
                f"within ±{TOLERANCE:.0%}",
                judge(value, abs(value - 1) <= TOLERANCE),
                "",
            )
        )
    section.data = {
        "comparison": "peak RSS while run_training runs minus RSS after the imports, vs estimate.total_bytes minus "
        "its 0.4 GiB import allowance (CPU_RUNTIME_BYTES); fp32 on the CPU, LoRA r8 all linear, dropout 0.05",
        "cases": rows,
        "median_ratio": median([float(r["measured_over_estimated"]) for r in rows]),
    }
    section.wall_s = time.perf_counter() - t0
    return section
