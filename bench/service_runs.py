"""Child process of the service benchmark: the engine in-process, as a user would run it without the service.

    python -m bench.service_runs --spec SPEC.json --mode once  --out R.json   # a fresh script: import, train, exit
    python -m bench.service_runs --spec SPEC.json --mode serve --out R.json   # warm: one run per stdin line

SPEC is {"config": {...TrainingConfig fields...}, "model_dir": ..., "dataset": ..., "work_dir": ...}. Every run
reports the wall time of `run_training` and the loop's own runtime; `import_s` is this process's import cost of
torch + transformers + peft + the engine (what a worker pays once per job).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402  (the import clock starts above)
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def _import_engine() -> float:
    import peft  # noqa: F401  (load_for_training imports it lazily: count it here, as the worker pays it)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import finetune_server.training.engine.recipe  # noqa: F401

    return time.perf_counter() - _T0


def train_once(spec: dict[str, Any]) -> dict[str, Any]:
    from finetune_server.training.config import TrainingConfig, resolve
    from finetune_server.training.engine.recipe import run_training

    config, _ = resolve(TrainingConfig.from_dict(spec["config"]))
    events: list[Any] = []
    work_dir = Path(spec["work_dir"])
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="inproc-") as tmp:
        t0 = time.perf_counter()
        outcome = run_training(
            config,
            model_ref=spec["model_dir"],
            dataset_path=spec["dataset"],
            output_dir=Path(tmp),
            on_event=events.append,
        )
        wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "train_runtime_s": outcome.train_runtime_s,
        "steps": outcome.steps,
        "tokens": outcome.trained_tokens,
        "events": len(events),
        "final_loss": outcome.final_train_loss,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--mode", choices=["once", "serve"], default="once")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import_s = _import_engine()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    spec = json.loads(args.spec.read_text())
    if args.mode == "once":
        result = train_once(spec)
        result["import_s"] = import_s
        args.out.write_text(json.dumps(result))
        return
    # serve: announce readiness, then one training per input line, one JSON line back each. The protocol gets its
    # own copy of stdout; fd 1 itself goes to stderr, so whatever a library prints cannot corrupt it.
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    protocol.write(json.dumps({"ready": True, "import_s": import_s}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        if not line.strip():
            break
        protocol.write(json.dumps(train_once(spec)) + "\n")
        protocol.flush()
    args.out.write_text(json.dumps({"import_s": import_s}))


if __name__ == "__main__":
    main()
