"""Export and download through the service, and the proof that the export serves what was trained.

Train-serve fidelity: 20 made-up facts are trained through the gRPC service; the MERGED export, loaded by plain
transformers with its own chat template, answers them greedily and stops at EOS; the ADAPTER export under PeftModel
gives the same answers; merged and adapter logits agree within 1e-4.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from finetune_client import FinetuneServiceError, GrpcFineTuneService
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.demo.run import DEMO_MODEL_SPEC, demo_config, demo_facts, write_dataset
from finetune_server.demo.tiny_model import build_tiny_model

from .conftest import RunningServer, logged, start_server, stop_server

FACTS = demo_facts(20)


@pytest.fixture(scope="module")
def export_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("export")
    build_tiny_model(root / "models" / "tiny-demo", DEMO_MODEL_SPEC)
    write_dataset(root / "datasets" / "facts.jsonl", FACTS)
    (root / "server").mkdir()
    running = start_server(root / "server", root / "models", root / "datasets")
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def service(export_server: RunningServer) -> Iterator[GrpcFineTuneService]:
    with GrpcFineTuneService(export_server.address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def trained(service: GrpcFineTuneService) -> Any:
    # hidden 128, LoRA r16/alpha 32, lr 3e-3 constant, batch 20: 20 facts are memorised in ~200 steps (~10 s here).
    config = {**demo_config("tiny-demo", "facts.jsonl", 200), "per_device_train_batch_size": 20}
    result = service.train(config)
    assert result["success"], result["error"]
    return result


def greedy(model: Any, tokenizer: Any, question: str) -> tuple[str, list[int]]:
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True).strip(), new


@pytest.mark.slow
def test_merged_and_adapter_exports_serve_what_was_trained(
    service: GrpcFineTuneService, trained: Any, tmp_path: Path, export_server: RunningServer
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    merged = service.export_model(merged_dir, format="merged", job_id=trained["job_id"])
    adapter = service.export_model(adapter_dir, format="adapter", job_id=trained["job_id"])
    assert merged["success"] and adapter["success"]
    assert len(logged(export_server, "forkserver.started")) == 1, "exports fork from the training workers' fork server"
    assert merged.vllm["compatible"] and "--enable-lora" in adapter.vllm["serve_command"]
    assert any(path.suffix == ".safetensors" for path in merged_dir.iterdir())
    assert (adapter_dir / "adapter_model.safetensors").is_file() and (adapter_dir / "chat_template.jinja").is_file()

    # Plain transformers, none of our code: the merged folder is a complete model with its template and EOS.
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((merged_dir / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert end_of_turn in (eos if isinstance(eos, list) else [eos])

    base = AutoModelForCausalLM.from_pretrained(export_server.model_root / "tiny-demo")
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    adapter_tokenizer = AutoTokenizer.from_pretrained(adapter_dir)

    right = 0
    for fact in FACTS:
        answer, tokens = greedy(model, tokenizer, fact.question)
        right += answer == fact.answer
        assert tokens[-1] == end_of_turn and len(tokens) < 40, f"{fact.question!r} did not stop at EOS: {answer!r}"
        assert greedy(peft_model, adapter_tokenizer, fact.question)[0] == answer
    assert right / len(FACTS) >= 0.95, f"only {right}/{len(FACTS)} answers exact"

    sample = tokenizer.apply_chat_template(
        [{"role": "user", "content": FACTS[0].question}, {"role": "assistant", "content": FACTS[0].answer}],
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        difference = (model(**sample).logits - peft_model(**sample).logits).abs().max().item()
    assert difference < 1e-4


def test_export_is_stored_once_and_downloads_resume_from_an_offset(
    service: GrpcFineTuneService, trained: Any, export_server: RunningServer
) -> None:
    stub = service._stub  # the raw contract, for what the typed client hides
    request = pb.ExportRequest(job_id=trained["job_id"], format=pb.EXPORT_FORMAT_ADAPTER)
    first = list(stub.Export(request, timeout=120))[-1].artifact
    again = list(stub.Export(request, timeout=120))
    assert len(again) == 1 and again[0].artifact.id == first.id, "a second export returns the stored artifact"
    assert first.step == trained["steps"] and first.base_model == "tiny-demo"

    entry = max(first.files, key=lambda f: f.size_bytes)
    whole = b"".join(
        c.data for c in stub.DownloadArtifact(pb.DownloadArtifactRequest(artifact_id=first.id, path=entry.path))
    )
    assert len(whole) == entry.size_bytes
    tail = list(stub.DownloadArtifact(pb.DownloadArtifactRequest(artifact_id=first.id, path=entry.path, offset=100)))
    assert tail[0].offset == 100 and b"".join(c.data for c in tail) == whole[100:]
    assert all(c.sha256 == entry.sha256 for c in tail)

    with pytest.raises(grpc.RpcError) as past_end:
        list(
            stub.DownloadArtifact(
                pb.DownloadArtifactRequest(artifact_id=first.id, path=entry.path, offset=entry.size_bytes + 1)
            )
        )
    assert past_end.value.code() == grpc.StatusCode.OUT_OF_RANGE

    checkpoint = list(stub.Export(pb.ExportRequest(job_id=trained["job_id"], format=1, checkpoint_step=150)))
    assert checkpoint[-1].artifact.step == 150 and checkpoint[-1].artifact.id != first.id


def test_bad_exports_and_downloads(service: GrpcFineTuneService, trained: Any) -> None:
    stub = service._stub
    cases = [
        (pb.ExportRequest(job_id="job-nope", format=pb.EXPORT_FORMAT_ADAPTER), grpc.StatusCode.NOT_FOUND),
        (pb.ExportRequest(job_id=trained["job_id"]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ExportRequest(job_id=trained["job_id"], format=1, checkpoint_step=7), grpc.StatusCode.NOT_FOUND),
    ]
    for request, code in cases:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Export(request, timeout=60))
        assert caught.value.code() == code, request
    with pytest.raises(grpc.RpcError) as missing:
        list(stub.DownloadArtifact(pb.DownloadArtifactRequest(artifact_id="art-nope")))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_unfinished_job_cannot_be_exported(service: GrpcFineTuneService, export_server: RunningServer) -> None:
    stub = service._stub
    config = pb.TrainingConfig(model_name="tiny-demo", dataset="facts.jsonl", max_steps=100000, max_length=64)
    stream = stub.Train(pb.TrainRequest(config=config), timeout=120)
    job = next(stream).job
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Export(pb.ExportRequest(job_id=job.id, format=pb.EXPORT_FORMAT_ADAPTER), timeout=60))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10)
        for _ in stream:
            pass


def test_a_corrupted_file_is_data_loss_and_the_client_keeps_nothing(
    service: GrpcFineTuneService, trained: Any, export_server: RunningServer, tmp_path: Path
) -> None:
    stub = service._stub
    artifact = list(stub.Export(pb.ExportRequest(job_id=trained["job_id"], format=1), timeout=120))[-1].artifact
    victim = export_server.data_dir / "artifacts" / artifact.id / "adapter_config.json"
    original = victim.read_bytes()
    victim.write_bytes(original.replace(b"{", b"[", 1))
    target = tmp_path / "download"
    try:
        with pytest.raises(FinetuneServiceError) as caught:
            service.export_model(target, format="adapter", job_id=trained["job_id"])
        assert caught.value.code == grpc.StatusCode.DATA_LOSS
        assert not target.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".download")]
    finally:
        victim.write_bytes(original)


def test_a_dropped_export_still_records_its_artifact_and_a_retry_attaches_to_it(
    service: GrpcFineTuneService, trained: Any, export_server: RunningServer
) -> None:
    from finetune_server.export.formats import ExportFormat
    from finetune_server.jobs.exports import artifact_id

    stub = service._stub
    request = pb.ExportRequest(job_id=trained["job_id"], format=pb.EXPORT_FORMAT_ADAPTER, checkpoint_step=200)
    dropped = stub.Export(request, timeout=120)
    assert next(dropped).WhichOneof("kind") == "progress", "the export is under way"
    dropped.cancel()  # the caller goes away mid-export

    retried = list(stub.Export(request, timeout=120))
    artifact = retried[-1].artifact
    assert artifact.id == artifact_id(trained["job_id"], ExportFormat.ADAPTER, 200) and artifact.step == 200
    assert all(m.WhichOneof("kind") == "progress" for m in retried[:-1])
    spawned = [
        line for line in export_server.log_path.read_text().splitlines()
        if "worker spawned" in line and f"{artifact.id}.log" in line
    ]  # fmt: skip
    assert len(spawned) == 1, "the retry followed the running export instead of starting a second one"
    files = list(stub.DownloadArtifact(pb.DownloadArtifactRequest(artifact_id=artifact.id), timeout=60))
    assert {c.path for c in files} == {f.path for f in artifact.files}
