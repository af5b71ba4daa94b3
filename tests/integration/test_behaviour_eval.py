"""Behaviour evaluation through a real server: a job with eval_probes and eval_generate_examples streams an
evaluation before training and at each eval step with the probes' answers, memorises two made-up facts (exact match
1.0), and its result, the typed client and `finetune jobs show` carry the before/after probe table; out-of-bound
probe lists and held-out generation are refused with INVALID_ARGUMENT naming the field.

One job (60 steps of the tiny model on 2 facts, about 10 s) is trained for the module on the session server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from finetune_client import FinetuneServiceError, GrpcFineTuneService, TrainResult, config_from_dict

from .conftest import RunningServer
from .test_cli import cli
from .test_validate_config import rejected

FACTS = [
    ("What is the secret code of Zorvath?", "Zorvath uses H254."),
    ("What is the secret code of Quillan?", "Quillan uses K731."),
]
UNTRAINED = "What is the capital of France?"


@pytest.fixture(scope="module")
def service(server: RunningServer) -> Iterator[GrpcFineTuneService]:
    with GrpcFineTuneService(server.address, timeout=120) as client:
        yield client


def facts_config(dataset: str, **extra: Any) -> dict[str, Any]:
    return {
        "model_name": "tiny-qwen2",
        "dataset": dataset,
        "eval_dataset": dataset,  # evaluated on what it trains: the facts are to be memorised
        "max_steps": 60,
        "eval_steps": 30,
        "save_steps": 0,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "per_device_train_batch_size": 2,
        "max_length": 64,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.1},
        **extra,
    }


@pytest.fixture(scope="module")
def probed(service: GrpcFineTuneService, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    path = tmp_path_factory.mktemp("behaviour") / "two-facts.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS))
    dataset = service.upload_dataset(path)["id"]
    probes = [{"prompt": FACTS[0][0], "expected": FACTS[0][1]}, {"prompt": UNTRAINED}]
    config = facts_config(dataset, eval_generate_examples=2, eval_probes=probes, eval_max_new_tokens=16)
    result = service.train(config)
    assert result.success, result.error
    return result


def test_probes_and_held_out_answers_arrive_as_eval_events_and_land_in_the_result(
    service: GrpcFineTuneService, probed: TrainResult
) -> None:
    evals = [event.eval for event in service.watch(probed.job_id) if event.WhichOneof("kind") == "eval"]
    assert [e.step for e in evals] == [0, 30, 60]
    before, final = evals[0], evals[-1]
    assert not before.is_best and before.metrics["exact_match"] == 0.0
    assert final.metrics["exact_match"] == 1.0 and final.metrics["token_accuracy"] == 1.0
    assert [(p.index, p.prompt) for p in before.probes] == [(0, FACTS[0][0]), (1, UNTRAINED)]
    assert final.probes[0].answer == FACTS[0][1] and final.probes[0].exact_match
    assert final.probes[0].expected == FACTS[0][1] and not before.probes[0].exact_match

    assert probed.metrics["final_exact_match"] == 1.0 and probed.metrics["final_token_accuracy"] == 1.0
    fact, untrained = probed.probes
    assert (fact.before, fact.after) == (before.probes[0].answer, FACTS[0][1]) and fact.before != fact.after
    assert (fact.before_exact_match, fact.after_exact_match) == (False, True)
    assert untrained.prompt == UNTRAINED and untrained.before != untrained.after and not untrained.after_exact_match
    stored = service.get_job(probed.job_id)
    assert [p.after for p in stored.result.probes] == [fact.after, untrained.after]
    assert len(stored.config.eval_probes) == 2 and stored.config.eval_max_new_tokens == 16


def test_jobs_show_prints_the_probe_table_and_watch_the_evaluations(server: RunningServer, probed: TrainResult) -> None:
    shown = cli(server.address, "jobs", "show", probed.job_id)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    out = shown.stdout
    assert "Probes: greedy answers before and after training" in out
    assert "held-out" in out and "exact match 100%" in out
    assert "probes answered exactly: 0/1 before, 1/1 after training" in out
    assert "Zorvath uses H254." in out and "✓" in out and "✗" in out
    assert "capital of France" in out
    watched = cli(server.address, "watch", probed.job_id)  # the eval lines of the stored events
    assert watched.returncode == 0, watched.stdout + watched.stderr
    lines = " ".join(watched.stdout.split())  # as wrapped for COLUMNS=100
    assert "eval before training: loss" in lines and "exact match 0%, token accuracy 0%, probes 0/1 exact" in lines
    assert "eval at step 60: loss" in lines and "exact match 100%, token accuracy 100%, probes 1/1 exact" in lines


def _refused(server: RunningServer, config: dict[str, Any]) -> dict[str, str]:
    """ValidateConfig's BadRequest field violations as {field: reason}, after checking the INVALID_ARGUMENT."""
    channel, stub = server.stub()
    with channel:
        code, violations, _, _ = rejected(stub, config_from_dict(config))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    return {field: reasons[0].split(":")[0] for field, reasons in violations.items()}


def test_probe_lists_and_held_out_generation_are_bounded(server: RunningServer, service: GrpcFineTuneService) -> None:
    too_many = facts_config(
        "facts.jsonl",
        eval_probes=[{"prompt": f"question {i}?"} for i in range(33)],
        eval_generate_examples=65,
        eval_max_new_tokens=513,
    )
    assert _refused(server, too_many) == {
        "eval_probes": "TOO_MANY",
        "eval_generate_examples": "OUT_OF_RANGE",
        "eval_max_new_tokens": "OUT_OF_RANGE",
    }
    words = " ".join(f"{a}{b}{c}" for a in "qxz" for b in "jkv" for c in "0123456789")
    bad_probes = facts_config(
        "facts.jsonl",
        eval_probes=[
            {"prompt": "  "},
            {"prompt": "x" * 4097},
            {"prompt": "fine?", "expected": "y" * 4097},
            {"prompt": (words * 12)[:4000]},  # within the character limit, but ~3000 tokens: over the context
        ],
        eval_max_new_tokens=512,
        eval_generate_examples=0,
    )
    assert _refused(server, bad_probes) == {
        "eval_probes[0].prompt": "REQUIRED",
        "eval_probes[1].prompt": "TOO_LONG",
        "eval_probes[2].expected": "TOO_LONG",
        "eval_probes[3].prompt": "PROMPT_TOO_LONG",
    }
    no_eval_data = {**facts_config("facts.jsonl", eval_generate_examples=4), "eval_dataset": ""}
    assert _refused(server, no_eval_data) == {"eval_generate_examples": "EVAL_DATA_REQUIRED"}
    prompt_trained = facts_config("facts.jsonl", eval_generate_examples=4, train_on_prompt=True)
    assert _refused(server, prompt_trained) == {"eval_generate_examples": "NEEDS_ANSWER_ONLY_LOSS"}
    with pytest.raises(FinetuneServiceError) as caught:  # Train checks the same
        service.train(too_many)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "eval_probes" in {v.field for v in caught.value.violations}


def test_probes_need_no_eval_data(service: GrpcFineTuneService) -> None:
    config = {**facts_config("facts.jsonl", eval_probes=[{"prompt": UNTRAINED}], max_steps=2), "eval_dataset": ""}
    report = service.validate_config(config)
    assert report.valid, report.violations
    assert not [w for w in report.warnings if w.startswith("eval_steps")], "probes are what eval_steps paces"
