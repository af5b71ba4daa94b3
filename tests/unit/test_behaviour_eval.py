"""Behaviour evaluation on the tiny model: the greedy helper answers exactly what plain transformers generates with
the same template, and a short run records probes before and after training and reports a memorised fact as an
exact match, without changing what the job trains."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_server.training.config import EvalProbe, LoraSettings, TrainingConfig, resolve
from finetune_server.training.engine.behaviour import answer_probes, stop_tokens
from finetune_server.training.engine.data_setup import load_tokenizer_and_template
from finetune_server.training.engine.events import EvalEvent, Event, ProgressEvent
from finetune_server.training.engine.recipe import TrainingOutcome, run_training

FACTS = [
    ("What is the secret code of Zorvath?", "Zorvath uses H254."),
    ("What is the secret code of Quillan?", "Quillan uses K731."),
]
UNTRAINED = "What is the capital of France?"
NEW_TOKENS = 12


def test_greedy_answers_equal_plain_transformers_generate(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # An adapter that changes the answers (LoRA's own init is a no-op), as a model under training has.
    model: Any = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    # What a base's generation_config.json may carry: none of it may reach a greedy evaluation.
    polluted = {"do_sample": True, "top_k": 3, "temperature": 5.0, "repetition_penalty": 2.0}
    for name, value in polluted.items():
        setattr(base.generation_config, name, value)
    tokens = load_tokenizer_and_template(tiny_model_dir, TrainingConfig())
    stop = stop_tokens(tiny_model_dir, tokens.template)
    probes = [EvalProbe(question) for question, _ in FACTS] + [EvalProbe(UNTRAINED)]
    ours = answer_probes(model, probes, tokens.tokenizer, tokens.template, max_new_tokens=NEW_TOKENS, stop=stop)
    assert base.generation_config.repetition_penalty == 2.0, "the model's own generation config is restored"

    tokenizer: Any = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    for probe, answer in zip(probes, ours, strict=True):
        messages = [{"role": "user", "content": probe.prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.0, eos_token_id=eos
            )
        expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer.answer == expected and answer.prompt == probe.prompt
        with torch.no_grad():
            penalised = model.generate(
                **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=2.0, eos_token_id=eos
            )
        assert penalised.tolist() != output.tolist(), "the base's penalty, had it slipped in, would show"


def _config(dataset: Path, **extra: Any) -> TrainingConfig:
    values: dict[str, Any] = {
        "max_steps": 60,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "per_device_train_batch_size": 2,
        "max_length": 64,
        "save_steps": 0,
        "eval_steps": 30,
        "lora": LoraSettings(r=16, alpha=32, dropout=0.1),
    }
    config, _ = resolve(TrainingConfig(model_name="tiny", dataset=str(dataset), **{**values, **extra}))
    return config


def _train(config: TrainingConfig, model_dir: Path, dataset: Path, out: Path) -> tuple[TrainingOutcome, list[Event]]:
    events: list[Event] = []
    outcome = run_training(
        config,
        model_ref=model_dir,
        dataset_path=dataset,
        eval_dataset_path=dataset,  # evaluated on what it trains: the facts are to be memorised
        output_dir=out,
        on_event=events.append,
        device="cpu",
    )
    return outcome, events


@pytest.mark.slow
def test_a_memorised_fact_is_an_exact_match_and_probes_show_before_and_after(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    dataset = tmp_path / "facts.jsonl"
    dataset.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS))
    probes = [EvalProbe(FACTS[0][0], FACTS[0][1]), EvalProbe(UNTRAINED)]
    config = _config(dataset, eval_generate_examples=2, eval_probes=probes, eval_max_new_tokens=16)
    outcome, events = _train(config, tiny_model_dir, dataset, tmp_path / "probed")

    evals = [e for e in events if isinstance(e, EvalEvent)]
    assert [e.step for e in evals] == [0, 30, 60]
    before, final = evals[0], evals[-1]
    assert not before.is_best and before.metrics["exact_match"] == 0.0 and before.eval_loss > final.eval_loss
    assert final.metrics == {"exact_match": 1.0, "token_accuracy": 1.0}
    assert [p.prompt for p in before.probes] == [FACTS[0][0], UNTRAINED] == [p.prompt for p in final.probes]
    assert final.probes[0].answer == FACTS[0][1] and final.probes[0].exact_match
    assert not before.probes[0].exact_match and not final.probes[1].exact_match  # no expected answer: never exact

    assert outcome.metrics["final_exact_match"] == 1.0 and outcome.metrics["final_token_accuracy"] == 1.0
    assert (outcome.metrics["probes_exact_before"], outcome.metrics["probes_exact_after"]) == (0.0, 1.0)
    fact, untrained = outcome.probes
    assert (fact.before, fact.after) == (before.probes[0].answer, FACTS[0][1]) and fact.before != fact.after
    assert (fact.before_exact_match, fact.after_exact_match) == (False, True)
    assert untrained.before != untrained.after and untrained.expected == ""
    report = json.loads((tmp_path / "probed" / "metrics.json").read_text())
    assert report["probes"][0]["after"] == FACTS[0][1] and report["final_exact_match"] == 1.0

    # Generating between steps leaves training as it was: the same losses, step for step, as without it (eval mode
    # was switched back to train mode, so dropout still drops; greedy decoding draws no random numbers).
    plain, plain_events = _train(_config(dataset), tiny_model_dir, dataset, tmp_path / "plain")
    losses = [e.loss for e in events if isinstance(e, ProgressEvent)]
    assert losses == [e.loss for e in plain_events if isinstance(e, ProgressEvent)]
    assert [e.step for e in plain_events if isinstance(e, EvalEvent)] == [30, 60], "no baseline without probes"
    assert plain.probes == [] and "final_exact_match" not in plain.metrics


def test_probes_survive_the_contract_and_the_job_record() -> None:
    from finetune_client import config_from_dict
    from finetune_server.api.convert import config_from_proto, config_to_proto

    message = config_from_dict(
        {"model_name": "m", "dataset": "d", "eval_probes": [{"prompt": "Hi?", "expected": "Hello."}, {"prompt": "x"}]}
    )
    config = config_from_proto(message)
    assert config.eval_probes == [EvalProbe("Hi?", "Hello."), EvalProbe("x")]
    stored = TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict())))  # as a job record keeps it
    assert stored == config and config_to_proto(stored).eval_probes == message.eval_probes


def test_probes_are_answered_without_eval_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    dataset = tmp_path / "facts.jsonl"
    dataset.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS))
    config = _config(dataset, max_steps=2, eval_steps=1, eval_probes=[EvalProbe(UNTRAINED)], eval_max_new_tokens=4)
    events: list[Event] = []
    outcome = run_training(
        config, model_ref=tiny_model_dir, dataset_path=dataset, output_dir=tmp_path / "out", on_event=events.append
    )
    evals = [e for e in events if isinstance(e, EvalEvent)]
    assert [e.step for e in evals] == [0, 1, 2] and all(len(e.probes) == 1 for e in evals)
    assert all(math.isnan(e.eval_loss) and math.isnan(e.perplexity) and not e.is_best for e in evals)
    assert outcome.final_eval_loss is None and [p.prompt for p in outcome.probes] == [UNTRAINED]
