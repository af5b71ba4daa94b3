"""Generate against a real server and real generation workers on the tiny model: streamed pieces from the base, a
job's final adapter, one of its checkpoints and an exported artifact, each equal to plain transformers' (and peft's)
greedy output with the template the adapter was trained with; the worker limit, a cancelled stream freeing its
worker, an idle worker exiting, a shutdown ending an answer CANCELLED, the bad requests, and `finetune chat` driven
through its stdin.

One job (6 steps, checkpoints at 3 and 6) is trained once for the module on the session server.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from finetune_client import FinetuneServiceError, GrpcFineTuneService
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb

from .conftest import RunningServer, start_server, stop_server, wait_for_log_event

QUESTION = [{"role": "user", "content": "What is the secret code of agent 3?"}]
NEW_TOKENS = 6
CHECKPOINT = 3


@pytest.fixture(scope="module")
def service(server: RunningServer) -> Iterator[GrpcFineTuneService]:
    with GrpcFineTuneService(server.address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def job(service: GrpcFineTuneService, server: RunningServer) -> dict[str, Any]:
    config = {
        "model_name": "tiny-qwen2",
        "dataset": "facts.jsonl",
        "max_steps": 2 * CHECKPOINT,
        "save_steps": CHECKPOINT,
        "learning_rate": 3e-2,  # enough for 6 steps to change the random model's greedy answer
        "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 8,
        "max_length": 64,
        "lora": {"r": 8},
    }
    result = service.train(config)
    assert result["success"], result["error"]
    return {"id": result["job_id"], "dir": server.data_dir / "jobs" / result["job_id"]}


def log_events(server: RunningServer, event: str) -> list[dict[str, Any]]:
    lines = server.log_path.read_text().splitlines()
    return [record for line in lines if line.startswith("{") and (record := json.loads(line)).get("event") == event]


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.05)  # polling the server's log: there is no other signal to wait on


def streamed(service: GrpcFineTuneService, **target: Any) -> tuple[list[str], pb.GenerateFinish]:
    with service.generate(QUESTION, max_new_tokens=NEW_TOKENS, **target) as stream:
        pieces = list(stream)
    assert stream.finish is not None
    return pieces, stream.finish


def transformers_greedy(model_dir: Path, adapter: Path | None, tokenizer_dir: Path) -> tuple[str, int]:
    """Plain transformers (and peft for an adapter), none of our code: the template saved with the adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    with torch.no_grad():
        output = model.eval().generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.mark.slow
def test_generate_streams_what_transformers_generates_for_base_job_checkpoint_and_artifact(
    service: GrpcFineTuneService, job: dict[str, Any], server: RunningServer
) -> None:
    model_dir = server.model_root / "tiny-qwen2"
    final_adapter = job["dir"] / "adapter"
    stub = service._stub  # the raw contract: the artifact's id
    artifact = list(stub.Export(pb.ExportRequest(job_id=job["id"], format=pb.EXPORT_FORMAT_ADAPTER), timeout=120))
    cases = {
        "base": ({"model_name": "tiny-qwen2"}, None, model_dir, 0),
        "job": ({"job_id": job["id"]}, final_adapter, final_adapter, 2 * CHECKPOINT),
        "checkpoint": (
            {"job_id": job["id"], "checkpoint_step": CHECKPOINT},
            job["dir"] / "checkpoints" / f"step-{CHECKPOINT:08d}" / "adapter",
            final_adapter,
            CHECKPOINT,
        ),
        "artifact": ({"artifact_id": artifact[-1].artifact.id}, final_adapter, final_adapter, 2 * CHECKPOINT),
    }
    answers = {}
    for name, (target, adapter, tokenizer_dir, step) in cases.items():
        pieces, finish = streamed(service, **target)
        expected, tokens = transformers_greedy(model_dir, adapter, tokenizer_dir)
        assert "".join(pieces) == expected, name
        assert len(pieces) > 1, f"{name}: the answer arrives in pieces"
        assert finish.completion_tokens == tokens and finish.prompt_tokens > 0, name
        assert finish.step == step and finish.base_model == "tiny-qwen2", name
        expected_reason = pb.FINISH_REASON_MAX_TOKENS if tokens == NEW_TOKENS else pb.FINISH_REASON_EOS
        assert finish.reason == expected_reason, name
        answers[name] = expected
    assert answers["job"] != answers["base"], "the adapter changes the answer (it is loaded, not ignored)"
    assert answers["artifact"] == answers["job"]

    # The artifact's worker is warm: a stop string cuts the answer before it, and a seed repeats a sampled answer.
    warm = {"artifact_id": artifact[-1].artifact.id, "max_new_tokens": NEW_TOKENS}
    answer = answers["artifact"]
    stop = answer[len(answer) // 2 :][:2]
    assert stop, answer
    with service.generate(QUESTION, stop=[stop], **warm) as cut:
        assert "".join(cut) == answer[: answer.find(stop)] and cut.finish is not None
    assert cut.finish.reason == pb.FINISH_REASON_STOP
    sampled = ["".join(service.generate(QUESTION, temperature=1.0, top_p=0.9, seed=7, **warm)) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_a_busy_worker_refuses_and_a_cancelled_stream_frees_it(
    service: GrpcFineTuneService, server: RunningServer
) -> None:
    base = {"model_name": "tiny-qwen2"}
    long = service.generate(QUESTION, max_new_tokens=1000, **base)  # the random base model never ends its turn
    next(long)
    with pytest.raises(FinetuneServiceError) as busy:  # the session server has one generation worker
        list(service.generate(QUESTION, max_new_tokens=2, **base))
    assert busy.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and busy.value.reason == "GENERATE_BUSY"
    assert busy.value.retry_delay is not None and busy.value.retry_delay > 0
    stopping_before = len(log_events(server, "generate.stopping"))
    long.close()  # the caller goes: the worker stops at its next token and takes the next request
    # The server hears of the cancel a moment later; a call before that would find the worker busy (and be told to
    # retry): wait until the server has told the worker to stop.
    wait_until(lambda: len(log_events(server, "generate.stopping")) > stopping_before)
    pieces, finish = streamed(service, **base)
    assert pieces and finish.reason == pb.FINISH_REASON_MAX_TOKENS
    wait_for_log_event(server, "generate.stopped", finish_reason="cancelled", timeout=30)


def test_bad_generate_requests(service: GrpcFineTuneService, job: dict[str, Any]) -> None:
    def refusal(messages: list[dict[str, str]] = QUESTION, **fields: Any) -> FinetuneServiceError:
        with pytest.raises(FinetuneServiceError) as caught:
            list(service.generate(messages, **fields))
        return caught.value

    missing = {
        "Job": refusal(job_id="job-nope"),
        "Checkpoint": refusal(job_id=job["id"], checkpoint_step=5),
        "Artifact": refusal(artifact_id="art-nope"),
        "Model": refusal(model_name="no-such-model"),
    }
    for kind, error in missing.items():
        assert error.code == grpc.StatusCode.NOT_FOUND, kind
        assert [r.resource_type for r in error.resources] == [f"finetune.sage/{kind}"], kind
    assert missing["Checkpoint"].resources[0].resource_name == "5"
    assert "3, 6" in missing["Checkpoint"].message, "the error lists the checkpoints there are"

    def fields(error: FinetuneServiceError) -> list[str]:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        return fields_of(error)

    assert fields(refusal(job_id=job["id"], max_new_tokens=1025)) == ["max_new_tokens"]
    assert fields(refusal([], job_id=job["id"])) == ["messages"]
    assert fields(refusal([{"role": "robot", "content": "hi"}], job_id=job["id"])) == ["messages[0].role"]
    assert fields(refusal(job_id=job["id"], model_name="tiny-qwen2")) == ["job_id"]
    assert fields(refusal(job_id=job["id"], temperature=-1, top_p=0)) == ["temperature", "top_p"]
    # Told by the worker, which has the tokenizer: the base model's, warm from the test before.
    too_long = refusal([{"role": "user", "content": "code " * 3000}], model_name="tiny-qwen2", max_new_tokens=2)
    assert fields(too_long) == ["messages"] and too_long.reason == "PROMPT_TOO_LONG"

    unfinished = service.iter_train({"model_name": "tiny-qwen2", "dataset": "facts.jsonl", "max_steps": 10_000})
    running = next(unfinished).job
    unfinished.close()
    try:
        error = refusal(job_id=running.id)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "NO_ADAPTER"
        assert fields_of(error) == ["job_id"]
    finally:
        service.cancel_job(running.id)


def fields_of(error: FinetuneServiceError) -> list[str]:
    return [v.field for v in error.violations]


def test_chat_cli_streams_base_and_tuned_answers(server: RunningServer, job: dict[str, Any]) -> None:
    command = [
        sys.executable, "-m", "finetune_server.cli.main", "chat", job["id"], "--compare-base",
        "--max-new-tokens", str(NEW_TOKENS), "--server", server.address,
    ]  # fmt: skip
    lines = f"{QUESTION[0]['content']}\n/exit\nnever read\n"
    done = subprocess.run(command, input=lines, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    model_dir, adapter = server.model_root / "tiny-qwen2", job["dir"] / "adapter"
    base, _ = transformers_greedy(model_dir, None, model_dir)
    tuned, _ = transformers_greedy(model_dir, adapter, adapter)
    output = done.stdout
    base_at, tuned_at = output.index("base (tiny-qwen2)> "), output.index(f"tuned ({job['id']})> ")
    assert base_at < tuned_at, "the base answers first, then the tuned model"
    assert output[base_at:tuned_at].removeprefix("base (tiny-qwen2)> ").startswith(base)
    assert output[tuned_at:].removeprefix(f"tuned ({job['id']})> ").startswith(tuned)
    assert output.count("> ") == 2, "one exchange: /exit ended the chat before the next line"


@pytest.mark.slow
def test_an_idle_worker_exits_and_a_shutdown_ends_an_answer_cancelled(
    tmp_path: Path, server_roots: tuple[Path, Path]
) -> None:
    own = start_server(tmp_path, *server_roots, "--generate-idle", "1")
    try:
        with GrpcFineTuneService(own.address, timeout=120) as client:
            streamed(client, model_name="tiny-qwen2")
            retired = wait_for_log_event(own, "generate.worker_retired", timeout=30)
            assert retired["why"] == "idle for 1 s"
            wait_for_log_event(own, "worker exited", timeout=30, returncode=0)  # its stdin closed: it left by itself

            answer = client.generate(QUESTION, model_name="tiny-qwen2", max_new_tokens=1000)
            next(answer)
            own.process.send_signal(signal.SIGTERM)
            list(answer)  # the rest, until the server says why it ended
            assert answer.finish is not None and answer.finish.reason == pb.FINISH_REASON_CANCELLED
            assert answer.finish.completion_tokens < 1000
    finally:
        assert stop_server(own) == 0
