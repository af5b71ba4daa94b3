"""The same loop under torchrun: 2 CPU processes on gloo follow the trajectory of 1 process with 2x accumulation.

Every optimizer step consumes one window of `grad_accum * world_size` planned micro-batches, rank r trains its r-th
share, and the loss is normalised by the trainable tokens of the whole window; so the two runs must agree.
This file is also the worker script that torchrun starts (see `__main__` below).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

COMMON: dict[str, Any] = {
    "max_steps": 4,
    "per_device_train_batch_size": 2,
    "learning_rate": 5e-3,
    "lr_scheduler_type": "linear",
    "warmup_ratio": 0.25,
    "max_length": 96,
    "save_steps": 2,
    "eval_split": 0.25,
    "eval_steps": 2,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
}


def _run(
    model_dir: str, dataset: str, output_dir: str, overrides: dict[str, Any], events_file: str, cache_dir: str = ""
) -> None:
    from finetune_server.errors import FinetuneError
    from finetune_server.training.config import TrainingConfig, resolve
    from finetune_server.training.data.token_cache import TokenCache
    from finetune_server.training.engine.events import EvalEvent, Event, LogEvent, ProgressEvent
    from finetune_server.training.engine.recipe import run_training

    config, _ = resolve(TrainingConfig.from_dict({"model_name": model_dir, "dataset": dataset, **overrides}))
    events: list[Event] = []
    try:
        run_training(
            config,
            model_ref=model_dir,
            dataset_path=dataset,
            output_dir=output_dir,
            on_event=events.append,
            token_cache=TokenCache(Path(cache_dir)) if cache_dir else None,
        )
    except FinetuneError as exc:  # each rank says how it ended, for the test to read
        Path(f"{events_file}.rank{os.environ.get('RANK', '0')}").write_text(exc.reason)
        raise
    if int(os.environ.get("RANK", "0")) == 0:
        rows = [
            {"step": e.step, "loss": e.loss, "tokens_seen": e.tokens_seen}
            for e in events
            if isinstance(e, ProgressEvent)
        ]
        evals = [
            {"step": e.step, "eval_loss": e.eval_loss, "metrics": e.metrics, "probes": [p.answer for p in e.probes]}
            for e in events
            if isinstance(e, EvalEvent)
        ]
        logs = [e.message for e in events if isinstance(e, LogEvent)]
        Path(events_file).write_text(json.dumps({"progress": rows, "evals": evals, "logs": logs}))


def _facts(path: Path) -> Path:
    rows = [
        {"instruction": f"Name of planet {i}?", "output": f"Planet {i} is called {'blue ' * (i % 4)}world {i}."}
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_two_processes_match_one_with_double_accumulation(tmp_path: Path, tiny_model_dir: Path) -> None:
    dataset = _facts(tmp_path / "facts.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    single = {**COMMON, "gradient_accumulation_steps": 2}
    double = {**COMMON, "gradient_accumulation_steps": 1}
    script = str(Path(__file__).resolve())

    subprocess.run(
        [
            sys.executable,
            script,
            str(tiny_model_dir),
            str(dataset),
            str(tmp_path / "one"),
            json.dumps(single),
            str(tmp_path / "one.json"),
        ],
        env=env,
        check=True,
        timeout=300,
    )
    two_ranks = _torchrun(
        [
            script,
            str(tiny_model_dir),
            str(dataset),
            str(tmp_path / "two"),
            json.dumps(double),
            str(tmp_path / "two.json"),
            str(tmp_path / "token-cache"),
        ],
        env,
    )
    assert two_ranks.returncode == 0, two_ranks.stderr[-3000:]
    # The ranks share one token cache entry: rank 0 tokenized (its events say so), rank 1 only opened it.
    output = two_ranks.stdout + two_ranks.stderr
    assert output.count("token cache hit: ") == 1 and output.count("examples into the token cache in ") == 1, output
    assert len([p for p in (tmp_path / "token-cache").iterdir() if not p.name.startswith(".")]) == 1
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert any(line.startswith("tokenized 16 examples into the token cache in ") for line in two["logs"])
    assert [r["step"] for r in two["progress"]] == [1, 2, 3, 4]
    for a, b in zip(one["progress"], two["progress"], strict=True):
        assert a["step"] == b["step"] and a["tokens_seen"] == b["tokens_seen"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert [e["step"] for e in two["evals"]] == [2, 4]
    for a, b in zip(one["evals"], two["evals"], strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    wa = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)
    # Only rank 0 wrote checkpoints, and they are complete.
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def _torchrun(script_args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """torchrun in its own process group: a hang that runs past `timeout` takes both ranks down with it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script_args]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_a_full_disk_on_rank_0_stops_every_rank_instead_of_leaving_them_at_a_barrier(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    dataset = _facts(tmp_path / "facts.jsonl")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
        "FINETUNE_FAULTS": "disk_full_at_checkpoint=1",
    }
    outcome = tmp_path / "two.json"
    args = [str(Path(__file__).resolve()), str(tiny_model_dir), str(dataset), str(tmp_path / "two")]
    # A hang would end in TimeoutExpired: the other rank would wait for rank 0 until gloo's 30-minute timeout.
    finished = _torchrun([*args, json.dumps({**COMMON, "gradient_accumulation_steps": 1}), str(outcome)], env)
    assert finished.returncode != 0
    assert Path(f"{outcome}.rank0").read_text() == "DISK_FULL"
    assert Path(f"{outcome}.rank1").read_text() == "PEER_FAILED"
    assert not (tmp_path / "two" / "checkpoints").exists() or not any((tmp_path / "two" / "checkpoints").iterdir())


@pytest.mark.slow
def test_eval_with_an_empty_slice_on_one_rank_and_each_ranks_own_generators(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """One eval batch for two ranks: rank 1 evaluates nothing. Through the DDP wrapper, rank 0's forward would enter
    a buffer broadcast that rank 1 never joins (a hang under NCCL, a mismatched collective under gloo). Probes and
    held-out generation run on rank 0 alone (through the bare model too) while rank 1 waits for it."""
    dataset = _facts(tmp_path / "facts.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # 16 x 0.125 = 2 eval examples = 1 batch of 2; dropout makes each rank's generator move its own way.
    overrides = {
        **COMMON,
        "eval_split": 0.125,
        "gradient_accumulation_steps": 1,
        "lora": {"r": 8, "dropout": 0.1},
        "eval_probes": [{"prompt": "Name of planet 3?"}],
        "eval_generate_examples": 2,
        "eval_max_new_tokens": 4,
    }
    outcome = tmp_path / "two.json"
    args = [str(Path(__file__).resolve()), str(tiny_model_dir), str(dataset), str(tmp_path / "two")]
    finished = _torchrun([*args, json.dumps(overrides), str(outcome)], env, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    evals = json.loads(outcome.read_text())["evals"]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(math.isfinite(e["eval_loss"]) for e in evals)
    assert all(len(e["probes"]) == 1 and set(e["metrics"]) == {"exact_match", "token_accuracy"} for e in evals)
    rng = torch.load(tmp_path / "two" / "checkpoints" / "step-00000002" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2  # each rank's own, not rank 0's for all
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])


if __name__ == "__main__":
    _run(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5], *sys.argv[6:])
