"""Resume equivalence: stop after a checkpoint, resume, finish == one uninterrupted run (weights and loss curve)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from finetune_server.training.config import LoraSettings, TrainingConfig, resolve
from finetune_server.training.engine.errors import TrainingCancelled
from finetune_server.training.engine.events import CheckpointEvent, Event, LogEvent, ProgressEvent
from finetune_server.training.engine.recipe import TrainingOutcome, run_training


def write_facts(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            answer = f"The secret number is {i * 37}." + " Yes." * (i % 5)
            f.write(json.dumps({"instruction": f"What is the secret number of city {i}?", "output": answer}) + "\n")
    return path


def make_config(model_dir: Path, dataset: Path, **kwargs: Any) -> TrainingConfig:
    config, _ = resolve(TrainingConfig(model_name=str(model_dir), dataset=str(dataset), max_length=128, **kwargs))
    return config


def test_stop_resume_finish_equals_uninterrupted(tmp_path: Path, tiny_model_dir: Path) -> None:
    dataset = write_facts(tmp_path / "facts.jsonl", n=12)
    # Dropout (RNG), warmup + cosine (scheduler), accumulation across epoch ends (data position), logging windows
    # that straddle the checkpoint (history): everything a resume must restore is in play.
    config = make_config(
        tiny_model_dir,
        dataset,
        max_steps=8,
        learning_rate=3e-3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        lr_scheduler_type="cosine",
        warmup_ratio=0.25,
        save_steps=5,
        logging_steps=2,
        eval_split=0.2,
        eval_steps=3,
        lora=LoraSettings(r=8, alpha=16, dropout=0.1),
    )

    straight: list[Event] = []
    full = run_training(
        config, model_ref=tiny_model_dir, dataset_path=dataset, output_dir=tmp_path / "a", on_event=straight.append
    )

    first: list[Event] = []

    def after_first_checkpoint() -> bool:
        return any(isinstance(e, CheckpointEvent) for e in first)

    try:
        run_training(
            config,
            model_ref=tiny_model_dir,
            dataset_path=dataset,
            output_dir=tmp_path / "b",
            on_event=first.append,
            should_stop=after_first_checkpoint,
        )
        raise AssertionError("expected a cancellation")
    except TrainingCancelled as stop:
        assert stop.step == 5
    # A newer checkpoint that never completed must not be picked up.
    (tmp_path / "b" / "checkpoints" / "step-00000007").mkdir()

    second: list[Event] = []
    resumed = run_training(
        config, model_ref=tiny_model_dir, dataset_path=dataset, output_dir=tmp_path / "b", on_event=second.append
    )
    assert isinstance(full, TrainingOutcome) and isinstance(resumed, TrainingOutcome)
    assert any(isinstance(e, LogEvent) and "resumed from checkpoints/step-00000005" in e.message for e in second)
    assert [e.step for e in second if isinstance(e, ProgressEvent)] == [6, 8]

    def curve(events: list[Event]) -> list[tuple[int, float, float]]:
        return [(e.step, e.loss, e.learning_rate) for e in events if isinstance(e, ProgressEvent)]

    assert curve(first + second) == curve(straight)
    assert resumed.final_eval_loss == full.final_eval_loss
    assert resumed.trained_tokens == full.trained_tokens and resumed.steps == full.steps == 8
    assert resumed.final_train_loss == full.final_train_loss
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    # The resumed run kept the newest checkpoints (save_total_limit 2): step 5 and the final one.
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.startswith("step-0")) == [
        "step-00000005",
        "step-00000007",
        "step-00000008",
    ]
