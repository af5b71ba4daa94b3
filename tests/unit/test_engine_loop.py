"""The training loop on the tiny model: it learns, reports true progress, accumulates by tokens, stops, fails well."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.training.config import LoraSettings, TrainingConfig, resolve
from finetune_server.training.engine.errors import (
    GpuFacts,
    NanLossError,
    NoUsableExamplesError,
    OutOfMemoryError,
    TrainingCancelled,
    out_of_memory_error,
    out_of_memory_hint,
)
from finetune_server.training.engine.events import CheckpointEvent, EvalEvent, Event, LogEvent, LogLevel, ProgressEvent
from finetune_server.training.engine.recipe import TrainingOutcome, run_training

COLOURS = "blue red green yellow purple orange black white".split()


def write_facts(path: Path, n: int = 16) -> Path:
    """n made-up facts in alpaca format: learnable, and with answers of different lengths."""
    with path.open("w") as f:
        for i in range(n):
            answer = f"The secret number is {COLOURS[i % 8]} {i * 37}." + " Yes." * (i % 5)
            f.write(json.dumps({"instruction": f"What is the secret number of city {i}?", "output": answer}) + "\n")
    return path


def make_config(model_dir: Path, dataset: Path, **kwargs: Any) -> TrainingConfig:
    lora = kwargs.pop("lora", LoraSettings(r=16, alpha=32, dropout=0.0))
    values: dict[str, Any] = {
        "learning_rate": 3e-3,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.05,
        "per_device_train_batch_size": 4,
        "max_length": 128,
        "save_steps": 0,
        "max_steps": 8,
    }
    values.update(kwargs)
    config, _ = resolve(TrainingConfig(model_name=str(model_dir), dataset=str(dataset), lora=lora, **values))
    return config


def train(
    config: TrainingConfig,
    model_dir: Path,
    output_dir: Path,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    eval_dataset: Path | None = None,
) -> tuple[TrainingOutcome | BaseException, list[Event]]:
    events: list[Event] = []
    try:
        outcome: TrainingOutcome | BaseException = run_training(
            config,
            model_ref=model_dir,
            dataset_path=config.dataset,
            eval_dataset_path=eval_dataset,
            output_dir=output_dir,
            on_event=events.append,
            should_stop=should_stop,
            device="cpu",
        )
    except (FinetuneError, TrainingCancelled) as exc:
        outcome = exc
    return outcome, events


def progress(events: list[Event]) -> list[ProgressEvent]:
    return [e for e in events if isinstance(e, ProgressEvent)]


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_loss_falls_on_a_learnable_task(tmp_path: Path, tiny_model_dir: Path) -> None:
    dataset = write_facts(tmp_path / "facts.jsonl")
    config = make_config(tiny_model_dir, dataset, max_steps=80, warmup_ratio=0.05)
    outcome, events = train(config, tiny_model_dir, tmp_path / "out")
    assert isinstance(outcome, TrainingOutcome)
    losses = [e.loss for e in progress(events)]
    assert len(losses) == 80 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.5, (first, last)  # a trend: exact losses depend on the random weights and torch's kernels


@pytest.mark.parametrize("flag", ["load_in_8bit", "load_in_4bit"])
def test_quantised_base_trains(tmp_path: Path, tiny_model_dir: Path, flag: str) -> None:
    """The quantised layers themselves are checked in test_model_loading; here the loop trains through them."""
    dataset = write_facts(tmp_path / "facts.jsonl")
    config = make_config(tiny_model_dir, dataset, max_steps=24, gradient_checkpointing=True, **{flag: True})
    outcome, events = train(config, tiny_model_dir, tmp_path / "out")
    assert isinstance(outcome, TrainingOutcome)
    losses = [e.loss for e in progress(events)]
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.1, losses
    adapter_config = json.loads((outcome.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)


def test_events_outcome_adapter_and_report(tmp_path: Path, tiny_model_dir: Path) -> None:
    dataset = write_facts(tmp_path / "facts.jsonl")
    config = make_config(tiny_model_dir, dataset, max_steps=6, logging_steps=2, save_steps=4, eval_split=0.25)
    outcome, events = train(config, tiny_model_dir, tmp_path / "out")
    assert isinstance(outcome, TrainingOutcome)

    reports = progress(events)
    assert [(e.step, e.total_steps) for e in reports] == [(2, 6), (4, 6), (6, 6)]
    assert all(e.tokens_per_second > 0 and e.learning_rate > 0 and e.grad_norm > 0 for e in reports)
    assert all(e.memory.device == "cpu" and e.memory.allocated_bytes > 0 for e in reports)
    assert [e.tokens_seen for e in reports] == sorted({e.tokens_seen for e in reports})  # strictly increasing
    assert reports[-1].tokens_seen == outcome.trained_tokens
    # 12 training examples (4 held out), batch 4: 3 micro-batches per epoch, so 6 steps are 2 epochs.
    assert reports[-1].epoch == pytest.approx(2.0)
    assert reports[-1].eta_s == pytest.approx(0.0)

    checkpoints = [e for e in events if isinstance(e, CheckpointEvent)]
    assert [(c.step, c.path) for c in checkpoints] == [
        (4, "checkpoints/step-00000004"),
        (6, "checkpoints/step-00000006"),
    ]
    assert all(c.size_bytes > 0 and (tmp_path / "out" / c.path / "complete").is_file() for c in checkpoints)

    evals = [e for e in events if isinstance(e, EvalEvent)]
    assert [e.step for e in evals] == [6]
    assert evals[0].perplexity == pytest.approx(math.exp(evals[0].eval_loss)) and evals[0].is_best

    assert outcome.steps == 6
    assert outcome.final_eval_loss == evals[0].eval_loss
    assert outcome.final_train_loss == pytest.approx(reports[-1].loss)
    assert outcome.metrics["train_examples"] == 12 and outcome.metrics["eval_examples"] == 4
    assert outcome.metrics["train_tokens_per_second"] > 0

    adapter = outcome.adapter_dir
    assert adapter == tmp_path / "out" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (adapter / name).is_file(), name
    model_template = (
        json.loads((tiny_model_dir / "tokenizer_config.json").read_text()).get("chat_template")
        or (tiny_model_dir / "chat_template.jinja").read_text()
    )
    assert (adapter / "chat_template.jinja").read_text() == model_template
    assert json.loads((adapter / "tokenizer_config.json").read_text())["chat_template"] == model_template
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 6
    assert (tmp_path / "out" / "loss_curve.png").read_bytes().startswith(b"\x89PNG")


def _four_examples(path: Path) -> Path:
    """Answers of very different lengths, so per-micro-batch means would weight tokens unequally."""
    rows = [
        {"instruction": "Name a colour.", "output": "Blue."},
        {"instruction": "Name another colour.", "output": "Red."},
        {"instruction": "Tell me a long story about the river.", "output": " ".join(["the river was blue"] * 12)},
        {"instruction": "Tell me about the city.", "output": " ".join(["the city has many people"] * 9)},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_accumulation_2x2_equals_batch_of_4(tmp_path: Path, tiny_model_dir: Path) -> None:
    from finetune_server.training.data import encode_many, iter_examples, load_chat_template, load_tokenizer
    from finetune_server.training.engine.batching import plan_batches

    dataset = _four_examples(tmp_path / "four.jsonl")
    common = {"max_steps": 2, "warmup_ratio": 0.0, "learning_rate": 1e-2, "max_grad_norm": 0.0}
    big, big_events = train(
        make_config(tiny_model_dir, dataset, per_device_train_batch_size=4, gradient_accumulation_steps=1, **common),
        tiny_model_dir,
        tmp_path / "big",
    )
    acc, acc_events = train(
        make_config(tiny_model_dir, dataset, per_device_train_batch_size=2, gradient_accumulation_steps=2, **common),
        tiny_model_dir,
        tmp_path / "acc",
    )
    assert isinstance(big, TrainingOutcome) and isinstance(acc, TrainingOutcome)

    # Precondition: the two micro-batches of the 2x2 run hold very different numbers of trainable tokens.
    tokenizer = load_tokenizer(tiny_model_dir)
    template = load_chat_template(tiny_model_dir)
    assert template is not None
    encoded = encode_many([e for _, e in iter_examples(dataset)], tokenizer, template, max_length=128)
    plan = plan_batches(
        [len(e.input_ids) for e in encoded], batch_size=2, packing=False, max_length=128, seed=42, epoch=0
    )
    counts = [sum(sum(1 for x in encoded[i].labels[1:] if x != -100) for i in b) for b in plan]
    assert max(counts) > 3 * min(counts), counts

    for a, b in zip(progress(big_events), progress(acc_events), strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
    assert big.trained_tokens == acc.trained_tokens
    big_w, acc_w = adapter_weights(big.adapter_dir), adapter_weights(acc.adapter_dir)
    for name, tensor in big_w.items():
        torch.testing.assert_close(acc_w[name], tensor, rtol=1e-4, atol=1e-6)


def test_cancel_between_micro_steps_saves_nothing_extra(tmp_path: Path, tiny_model_dir: Path) -> None:
    dataset = write_facts(tmp_path / "facts.jsonl")
    events: list[Event] = []
    config = make_config(tiny_model_dir, dataset, max_steps=20, save_steps=2, gradient_accumulation_steps=2)
    calls = {"n": 0}

    def stop_in_step_four() -> bool:
        calls["n"] += 1
        return calls["n"] == 8  # 2 micro-steps per step: the second micro-step of step 4

    with pytest.raises(TrainingCancelled) as info:
        run_training(
            config,
            model_ref=tiny_model_dir,
            dataset_path=dataset,
            output_dir=tmp_path / "out",
            on_event=events.append,
            should_stop=stop_in_step_four,
            device="cpu",
        )
    assert info.value.step == 3
    assert [e.step for e in progress(events)] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (tmp_path / "out" / "adapter").exists()
    assert any(isinstance(e, LogEvent) and "cancelled at step 3" in e.message for e in events)


def test_nan_loss_is_pinned_to_its_step_and_keeps_the_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A forward hook (torch's global hook API) poisons the embeddings from the 5th forward pass on."""
    dataset = write_facts(tmp_path / "facts.jsonl")
    config = make_config(tiny_model_dir, dataset, max_steps=10, save_steps=2, logging_steps=3)
    forwards = {"n": 0}

    def poison(module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(module, torch.nn.Embedding):
            forwards["n"] += 1
            if forwards["n"] >= 5:
                return output * float("nan")
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(poison)
    try:
        outcome, events = train(config, tiny_model_dir, tmp_path / "out")
    finally:
        handle.remove()
    assert isinstance(outcome, NanLossError)
    assert outcome.reason == "NAN_LOSS" and outcome.step == 5 and "step 5" in outcome.message
    assert "learning_rate" in outcome.hint
    # The checkpoint of step 4 survives; no checkpoint holds poisoned weights; no adapter was published.
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert not (tmp_path / "out" / "adapter").exists()
    assert [e.step for e in progress(events)] == [3]


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 8 GB"),
    ],
)
def test_out_of_memory_becomes_an_actionable_error(tmp_path: Path, tiny_model_dir: Path, error: Exception) -> None:
    """A forward hook raises what torch raises when an allocation fails, in the 3rd forward pass."""
    dataset = write_facts(tmp_path / "facts.jsonl")
    config = make_config(tiny_model_dir, dataset, max_steps=10, save_steps=2)
    forwards = {"n": 0}

    def allocate(module: torch.nn.Module, _inputs: Any, _output: Any) -> None:
        if isinstance(module, torch.nn.Embedding):
            forwards["n"] += 1
            if forwards["n"] == 3:
                raise error

    handle = torch.nn.modules.module.register_module_forward_hook(allocate)
    try:
        outcome, _ = train(config, tiny_model_dir, tmp_path / "out")
    finally:
        handle.remove()
    assert isinstance(outcome, OutOfMemoryError)
    assert outcome.reason == "OUT_OF_MEMORY" and outcome.kind is ErrorKind.RESOURCE_EXHAUSTED and outcome.step == 3
    assert all(
        word in outcome.hint for word in ("per_device_train_batch_size", "gradient_checkpointing", "load_in_4bit")
    )
    assert outcome.__cause__ is error
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-00000002"]


def test_out_of_memory_while_loading_the_model_is_the_same_typed_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Building the model registers its parameters: failing there is what a model too big for the device does."""
    dataset = write_facts(tmp_path / "facts.jsonl")
    config = make_config(tiny_model_dir, dataset, max_steps=2)

    def allocate(_module: torch.nn.Module, _name: str, _param: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(allocate)
    try:
        outcome, _ = train(config, tiny_model_dir, tmp_path / "out")
    finally:
        handle.remove()
    assert isinstance(outcome, OutOfMemoryError), outcome  # before: the raw torch error, a crash the server retries
    assert outcome.reason == "OUT_OF_MEMORY" and outcome.step == 0
    assert "while loading the model" in outcome.message and "gradient_checkpointing" in outcome.hint


def test_cublas_failing_to_allocate_is_out_of_memory() -> None:
    error = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    oom = out_of_memory_error(error, step=1, device="cpu", config=TrainingConfig())
    assert oom is not None and oom.reason == "OUT_OF_MEMORY"
    assert (
        out_of_memory_error(
            RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"), step=1, device="cpu", config=TrainingConfig()
        )
        is None
    )


def test_out_of_memory_hints_on_a_gpu_offer_16_bit_and_the_8_bit_optimizer() -> None:
    fp32, _ = resolve(TrainingConfig(per_device_train_batch_size=1, max_length=64))
    ampere = out_of_memory_hint(fp32, gpu=GpuFacts(bf16_supported=True))
    assert "bf16=true" in ampere and "optim=paged_adamw_8bit" in ampere and "CUDA only" not in ampere
    turing = out_of_memory_hint(fp32, gpu=GpuFacts(bf16_supported=False))
    assert "fp16=true" in turing and "bf16" not in turing  # no bf16 where it is only emulated
    on_cpu = out_of_memory_hint(fp32)
    assert "bf16" not in on_cpu and "paged_adamw_8bit" not in on_cpu
    bf16, _ = resolve(TrainingConfig(bf16=True, optim="paged_adamw_8bit", load_in_4bit=True, max_length=64))
    assert "=true (16-bit" not in out_of_memory_hint(bf16, gpu=GpuFacts(True))


def test_early_stopping_when_eval_stops_improving(tmp_path: Path, tiny_model_dir: Path) -> None:
    dataset = write_facts(tmp_path / "facts.jsonl")
    # Learning rate 0: eval loss never improves after the first eval, so patience 1 stops at the second.
    config = make_config(
        tiny_model_dir, dataset, max_steps=20, learning_rate=0.0, eval_steps=2, early_stopping_patience=1
    )
    outcome, events = train(config, tiny_model_dir, tmp_path / "out", eval_dataset=dataset)
    assert isinstance(outcome, TrainingOutcome)
    evals = [e for e in events if isinstance(e, EvalEvent)]
    assert [(e.step, e.is_best) for e in evals] == [(2, True), (4, False)]
    assert outcome.stopped_early and outcome.steps == 4
    assert outcome.metrics["eval_examples"] == 16
    assert [e.step for e in events if isinstance(e, CheckpointEvent)] == [4]
    assert (outcome.adapter_dir / "adapter_model.safetensors").is_file()


def test_truncation_is_counted_and_packing_trains(tmp_path: Path, tiny_model_dir: Path) -> None:
    dataset = write_facts(tmp_path / "facts.jsonl")
    config = make_config(tiny_model_dir, dataset, max_steps=3, max_length=32, packing=True)
    outcome, events = train(config, tiny_model_dir, tmp_path / "out")
    assert isinstance(outcome, TrainingOutcome)
    assert outcome.metrics["truncated_examples"] > 0
    assert any(isinstance(e, LogEvent) and e.level is LogLevel.WARNING and "truncated" in e.message for e in events)
    assert all(math.isfinite(e.loss) for e in progress(events))


def test_no_usable_examples(tmp_path: Path, tiny_model_dir: Path) -> None:
    dataset = write_facts(tmp_path / "facts.jsonl")
    config = make_config(tiny_model_dir, dataset, max_length=8)  # the prompt alone is longer: no answer token left
    outcome, _ = train(config, tiny_model_dir, tmp_path / "out")
    assert isinstance(outcome, NoUsableExamplesError)
    assert outcome.reason == "NO_USABLE_EXAMPLES" and outcome.kind is ErrorKind.INVALID_ARGUMENT
    assert outcome.violations[0].field == "dataset"


def _without_template(tiny_model_dir: Path, target: Path) -> Path:
    shutil.copytree(tiny_model_dir, target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config_file = target / "tokenizer_config.json"
    data = json.loads(config_file.read_text())
    data.pop("chat_template", None)
    config_file.write_text(json.dumps(data))
    return target


def test_missing_chat_template_fallback_or_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    from finetune_server.training.data import FALLBACK_CHAT_TEMPLATE

    model_dir = _without_template(tiny_model_dir, tmp_path / "bare-model")
    dataset = write_facts(tmp_path / "facts.jsonl")

    refused, _ = train(
        make_config(model_dir, dataset, allow_fallback_chat_template=False), model_dir, tmp_path / "refused"
    )
    assert isinstance(refused, FinetuneError) and refused.reason == "NO_CHAT_TEMPLATE"

    outcome, events = train(make_config(model_dir, dataset, max_steps=1), model_dir, tmp_path / "fallback")
    assert isinstance(outcome, TrainingOutcome)
    assert any(isinstance(e, LogEvent) and "fallback" in e.message for e in events)
    assert (outcome.adapter_dir / "chat_template.jinja").read_text() == FALLBACK_CHAT_TEMPLATE


def test_a_progress_window_is_the_loss_rows_after_the_last_reported_step() -> None:
    from finetune_server.training.engine.recipe import _rows_since

    history: list[dict[str, float]] = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]
    history += [{"step": 2, "eval_loss": 2.5}, {"step": 3, "loss": 1.0}]
    assert _rows_since(history, 1) == [{"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.0}]
    assert _rows_since(history, 0) == [r for r in history if "loss" in r]
    assert _rows_since(history, 3) == []
