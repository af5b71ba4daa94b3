"""ValidateConfig against a real server: good configs get a report, bad ones the right status and every violation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc

from .conftest import RunningServer, wait_for_log_event, write_jsonl


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.FineTuneServiceStub]:
    channel, stub = server.stub()
    yield stub
    channel.close()


@pytest.fixture(scope="module")
def model_name(tiny_model_dir: Path) -> str:
    return tiny_model_dir.name  # relative to the server's --model-dir root


def base_config(model: str, **overrides: Any) -> pb.TrainingConfig:
    config = pb.TrainingConfig(model_name=model, dataset="facts.jsonl", max_length=256)
    for key, value in overrides.items():
        if key == "lora":
            config.lora.CopyFrom(pb.LoraConfig(**value))
        else:
            setattr(config, key, value)
    return config


def rejected(
    stub: pb_grpc.FineTuneServiceStub, config: pb.TrainingConfig, **request: Any
) -> tuple[grpc.StatusCode, dict[str, list[str]], pb.ValidateConfigResponse, error_details_pb2.ErrorInfo]:
    """Call ValidateConfig expecting a rejection; return the code, violations by field, the report and ErrorInfo."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.ValidateConfig(pb.ValidateConfigRequest(config=config, **request), timeout=30)
    error = caught.value
    status = rpc_status.from_call(error)
    assert status is not None, "rejections carry google.rpc.Status details"
    by_field: dict[str, list[str]] = {}
    report = pb.ValidateConfigResponse()
    info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                by_field.setdefault(v.field, []).append(f"{v.reason}: {v.description}")
        elif detail.Is(pb.ValidateConfigResponse.DESCRIPTOR):
            detail.Unpack(report)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
    assert info.domain == "finetune.sage"
    assert not report.valid
    return error.code(), by_field, report, info


def test_good_config_gets_a_full_report(stub: pb_grpc.FineTuneServiceStub, model_name: str) -> None:
    response = stub.ValidateConfig(
        pb.ValidateConfigRequest(config=base_config(model_name), target_device="rtx_3060"), timeout=30
    )
    assert response.valid and not response.violations
    # Defaults filled, explicit values kept.
    assert response.resolved_config.max_length == 256
    assert response.resolved_config.lora.r == 16 and response.resolved_config.lora.alpha == 32
    assert response.resolved_config.learning_rate == pytest.approx(2e-4)
    # The model was read from config.json and its safetensors header, not loaded.
    assert response.model.model_type == "qwen2" and response.model.num_layers == 2
    assert response.model.num_parameters > 100_000 and response.model.has_chat_template
    assert "q_proj" in response.model.linear_modules
    # The dataset was read line by line and tokenised with the model's template.
    assert response.dataset.num_examples == 24 and response.dataset.num_valid == 24
    assert response.dataset.format_counts["alpaca"] == 24
    stats = response.dataset.token_stats
    assert 10 < stats.min <= stats.p50 <= stats.p95 <= stats.max < 256
    # A memory estimate with a verdict for this server's device and for the named one.
    estimate = response.memory_estimate
    assert estimate.total_bytes == sum(
        [
            estimate.weights_bytes,
            estimate.adapter_bytes,
            estimate.gradients_bytes,
            estimate.optimizer_bytes,
            estimate.activations_bytes,
            estimate.overhead_bytes,
        ]
    )
    devices = {fit.device: fit for fit in estimate.fits}
    assert "rtx_3060" in devices and devices["rtx_3060"].fits
    assert devices["rtx_3060"].capacity_bytes == 12 * 2**30
    assert any(name == "cpu" for name in devices)


def test_preset_fills_only_unset_fields(stub: pb_grpc.FineTuneServiceStub, model_name: str) -> None:
    config = base_config(model_name, preset="rtx_3060", per_device_train_batch_size=2)
    config.ClearField("max_length")
    response = stub.ValidateConfig(pb.ValidateConfigRequest(config=config), timeout=30)
    resolved = response.resolved_config
    assert resolved.load_in_8bit and resolved.gradient_checkpointing
    assert resolved.max_length == 1024 and resolved.gradient_accumulation_steps == 16
    assert resolved.per_device_train_batch_size == 2, "an explicit value is never overridden by the preset"
    filled = set(response.preset_filled_fields)
    assert {"load_in_8bit", "max_length", "gradient_accumulation_steps"} <= filled
    assert "per_device_train_batch_size" not in filled
    # bf16 came from the preset, not the caller: on this CPU server it is a warning, not a violation.
    assert response.valid


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        ({"lora": {"r": 0}}, "lora.r", "OUT_OF_RANGE"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout", "OUT_OF_RANGE"),
        ({"learning_rate": 0.0}, "learning_rate", "OUT_OF_RANGE"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size", "OUT_OF_RANGE"),
        ({"max_length": 100_000}, "max_length", "OUT_OF_RANGE"),  # beyond the model's 2048 positions
        ({"load_in_8bit": True, "load_in_4bit": True}, "load_in_4bit", "MUTUALLY_EXCLUSIVE"),
        ({"fp16": True, "bf16": True}, "fp16", "MUTUALLY_EXCLUSIVE"),
        ({"bf16": True}, "bf16", "UNSUPPORTED_ON_DEVICE"),  # this server has only a CPU
        ({"lora": {"target_modules": ["q_proj", "attn.c_attn"]}}, "lora.target_modules", "TARGET_MODULES_NOT_FOUND"),
        ({"lr_scheduler_type": "cosine_with_restarts"}, "lr_scheduler_type", "INVALID_VALUE"),
        ({"data_format": "csv"}, "data_format", "INVALID_VALUE"),
        ({"preset": "rtx_9999"}, "preset", "UNKNOWN_PRESET"),
        ({"early_stopping_patience": 3}, "early_stopping_patience", "EVAL_DATA_REQUIRED"),
        ({"warmup_ratio": 1.0}, "warmup_ratio", "OUT_OF_RANGE"),
        ({"eval_split": 0.9}, "eval_split", "OUT_OF_RANGE"),
        ({"optim": "sgd"}, "optim", "INVALID_VALUE"),
    ],
)
def test_bad_field_is_invalid_argument_naming_the_field(
    stub: pb_grpc.FineTuneServiceStub, model_name: str, overrides: dict[str, Any], field: str, reason: str
) -> None:
    code, violations, report, info = rejected(stub, base_config(model_name, **overrides))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.reason == "INVALID_CONFIG"
    assert field in violations, violations
    assert any(v.startswith(reason) for v in violations[field]), violations[field]
    assert any(v.field == field and v.reason == reason for v in report.violations)


def test_all_problems_are_reported_at_once(stub: pb_grpc.FineTuneServiceStub, model_name: str) -> None:
    config = base_config(
        model_name, learning_rate=-1.0, gradient_accumulation_steps=0, lora={"r": 0, "alpha": 0, "dropout": -0.5}
    )
    code, violations, report, _ = rejected(stub, config)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"learning_rate", "gradient_accumulation_steps", "lora.r", "lora.alpha", "lora.dropout"} <= set(violations)
    assert report.model.model_type == "qwen2", "the report still carries what could be learnt"


def test_unknown_model_is_not_found(stub: pb_grpc.FineTuneServiceStub) -> None:
    code, violations, _, _ = rejected(stub, base_config("no-such-model-folder"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "model_name" in violations


def test_hub_model_offline_and_not_cached_is_not_found(stub: pb_grpc.FineTuneServiceStub) -> None:
    code, violations, _, _ = rejected(stub, base_config("Qwen/Qwen2.5-0.5B-Instruct"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert any("MODEL_NOT_CACHED_OFFLINE" in v for v in violations["model_name"]), violations


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"model_name": "../../etc"}, "model_name"),
        ({"model_name": "/etc"}, "model_name"),
        ({"dataset": "/etc/passwd"}, "dataset"),
        ({"dataset": "../../../../etc/passwd"}, "dataset"),
    ],
)
def test_paths_outside_the_roots_are_permission_denied(
    stub: pb_grpc.FineTuneServiceStub, model_name: str, overrides: dict[str, Any], field: str
) -> None:
    code, violations, _, _ = rejected(stub, base_config(model_name, **overrides))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert field in violations


def test_symlink_escaping_the_dataset_root_is_permission_denied(
    stub: pb_grpc.FineTuneServiceStub, model_name: str, server: RunningServer, tmp_path: Path
) -> None:
    outside = write_jsonl(tmp_path / "secret.jsonl", [{"text": "private"}])
    link = server.dataset_root / "escape.jsonl"
    link.symlink_to(outside)
    try:
        code, violations, _, _ = rejected(stub, base_config(model_name, dataset="escape.jsonl"))
    finally:
        link.unlink()
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "dataset" in violations


def test_missing_dataset_and_unknown_upload_id_are_not_found(
    stub: pb_grpc.FineTuneServiceStub, model_name: str
) -> None:
    for name in ("missing.jsonl", "ds-0123456789abcdef"):
        code, violations, _, _ = rejected(stub, base_config(model_name, dataset=name))
        assert code == grpc.StatusCode.NOT_FOUND, name
        assert "dataset" in violations


def test_bad_dataset_lines_are_reported_with_line_numbers(
    stub: pb_grpc.FineTuneServiceStub, model_name: str, server: RunningServer
) -> None:
    lines = [
        json.dumps({"instruction": "Say hi", "output": "hi"}),
        "{not json",
        json.dumps({"instruction": "No answer"}),
        json.dumps({"messages": [{"role": "wizard", "content": "abracadabra"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps([1, 2, 3]),
        json.dumps({"question": "q", "answer": 7}),
        json.dumps({"text": "plain text is fine"}),
    ]
    (server.dataset_root / "broken.jsonl").write_text("\n".join(lines) + "\n")
    code, violations, report, _ = rejected(stub, base_config(model_name, dataset="broken.jsonl"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    bad_lines = sorted(v.line for v in report.violations if v.field == "dataset")
    assert bad_lines == [2, 3, 4, 5, 6, 7]
    assert all(d.split(": ", 1)[1].startswith("line ") for d in violations["dataset"])
    assert report.dataset.num_examples == 8 and report.dataset.num_valid == 2 and report.dataset.num_invalid == 6


def test_bad_lines_past_the_cap_are_counted(
    stub: pb_grpc.FineTuneServiceStub, model_name: str, server: RunningServer
) -> None:
    (server.dataset_root / "many-bad.jsonl").write_text("{oops\n" * 250)
    _, _, report, _ = rejected(stub, base_config(model_name, dataset="many-bad.jsonl"))
    assert report.dataset.num_invalid == 250
    assert report.dataset.violations_truncated
    assert 0 < len([v for v in report.violations if v.line]) < 250


def test_empty_dataset_is_rejected(stub: pb_grpc.FineTuneServiceStub, model_name: str, server: RunningServer) -> None:
    (server.dataset_root / "empty.jsonl").write_text("")
    code, violations, _, _ = rejected(stub, base_config(model_name, dataset="empty.jsonl"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset" in violations


def test_truncation_and_vllm_rank_are_warnings_not_violations(
    stub: pb_grpc.FineTuneServiceStub, model_name: str
) -> None:
    # Rank 1024 is above vLLM's largest --max-lora-rank (512).
    response = stub.ValidateConfig(
        pb.ValidateConfigRequest(config=base_config(model_name, max_length=16, lora={"r": 1024})), timeout=30
    )
    assert response.valid
    reasons = {w.reason for w in response.warnings}
    assert {"TRUNCATION", "VLLM_UNSUPPORTED_RANK"} <= reasons
    assert response.dataset.num_over_max_length > 0


def test_a_rank_between_vllm_max_ranks_serves(stub: pb_grpc.FineTuneServiceStub, model_name: str) -> None:
    """vLLM serves rank 12 under --max-lora-rank 16, so ValidateConfig does not warn (as Export calls it compatible)."""
    response = stub.ValidateConfig(pb.ValidateConfigRequest(config=base_config(model_name, lora={"r": 12})), timeout=30)
    assert response.valid
    assert not [w for w in response.warnings if w.reason.startswith("VLLM_")], response.warnings


def test_unknown_target_device_is_invalid(stub: pb_grpc.FineTuneServiceStub, model_name: str) -> None:
    code, violations, _, _ = rejected(stub, base_config(model_name), target_device="gtx_480")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "target_device" in violations


def test_memory_verdict_says_how_to_fit(
    stub: pb_grpc.FineTuneServiceStub, model_name: str, server: RunningServer
) -> None:
    # A batch of 4096 x 2048 tokens of a 1024-token vocabulary: the logits alone exceed 12 GB.
    long_text = [{"text": " ".join(["word"] * 3000)} for _ in range(4)]
    write_jsonl(server.dataset_root / "long.jsonl", long_text)
    config = base_config(model_name, dataset="long.jsonl", max_length=2048, per_device_train_batch_size=4096)
    response = stub.ValidateConfig(pb.ValidateConfigRequest(config=config, target_device="rtx_3060"), timeout=30)
    fit = {f.device: f for f in response.memory_estimate.fits}["rtx_3060"]
    assert not fit.fits and fit.utilization > 1
    assert fit.suggestions, "a config that does not fit says what to change"
    assert any(w.reason == "MAY_NOT_FIT" for w in response.warnings)


def test_a_max_length_the_caller_did_not_write_is_capped_at_the_models_positions(
    stub: pb_grpc.FineTuneServiceStub, server: RunningServer
) -> None:
    from finetune_server.demo.tiny_model import TinyModelSpec, build_tiny_model

    short = build_tiny_model(server.model_root / "tiny-512-positions", TinyModelSpec(max_position_embeddings=512))
    for preset in ("", "rtx_3060"):  # the default 2048, then a preset's 1024
        config = base_config(short.name, preset=preset)
        config.ClearField("max_length")
        response = stub.ValidateConfig(pb.ValidateConfigRequest(config=config), timeout=60)
        assert response.valid and response.resolved_config.max_length == 512, preset
        capped = [w for w in response.warnings if w.reason == "MAX_LENGTH_CAPPED"]
        assert len(capped) == 1 and capped[0].field == "max_length" and "512" in capped[0].message
    code, by_field, _, _ = rejected(stub, base_config(short.name, max_length=1024))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and by_field["max_length"][0].startswith("OUT_OF_RANGE")  # explicit


def _qa_rows(n: int) -> list[object]:
    return [{"instruction": f"What is {i} plus one?", "output": f"{i + 1}."} for i in range(n)]


BIG_ROWS = 120_000  # several seconds of checking with the tiny tokenizer on this machine


def test_a_validation_past_its_deadline_stops_checking(
    stub: pb_grpc.FineTuneServiceStub, model_name: str, server: RunningServer
) -> None:
    write_jsonl(server.dataset_root / "big-deadline.jsonl", _qa_rows(BIG_ROWS))
    config = base_config(model_name, dataset="big-deadline.jsonl")
    with pytest.raises(grpc.RpcError) as caught:
        stub.ValidateConfig(pb.ValidateConfigRequest(config=config), timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stopped = wait_for_log_event(server, "dataset_check_stopped", dataset="big-deadline.jsonl")
    assert 0 < int(stopped["records_checked"]) < BIG_ROWS  # type: ignore[call-overload]


def test_the_streamed_validation_reports_progress_then_the_same_report(
    stub: pb_grpc.FineTuneServiceStub, model_name: str, server: RunningServer
) -> None:
    rows = 3000
    write_jsonl(server.dataset_root / "progress.jsonl", _qa_rows(rows))
    config = base_config(model_name, dataset="progress.jsonl")
    responses = list(stub.StreamValidateConfig(pb.StreamValidateConfigRequest(config=config), timeout=60))
    progress = [r.progress for r in responses[:-1]]
    assert progress and all(r.WhichOneof("kind") == "progress" for r in responses[:-1])
    assert {p.field for p in progress} == {"dataset"} and {p.records_estimated for p in progress} == {rows}
    checked = [p.records_checked for p in progress]
    assert checked == sorted(checked) and 0 < checked[-1] <= rows
    report = responses[-1].report
    assert report.valid and report.dataset.num_examples == rows
    assert report == stub.ValidateConfig(pb.ValidateConfigRequest(config=config), timeout=30)


def test_a_streamed_rejection_carries_the_status_and_report_of_validate_config(
    stub: pb_grpc.FineTuneServiceStub, model_name: str
) -> None:
    config = base_config(model_name, dataset="missing.jsonl")
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.StreamValidateConfig(pb.StreamValidateConfigRequest(config=config), timeout=30))
    code, by_field, report, info = rejected(stub, config)
    assert caught.value.code() == code == grpc.StatusCode.NOT_FOUND and "dataset" in by_field
    status = rpc_status.from_call(caught.value)
    assert status is not None
    streamed = pb.ValidateConfigResponse()
    streamed_info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Is(pb.ValidateConfigResponse.DESCRIPTOR):
            detail.Unpack(streamed)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(streamed_info)
    assert streamed == report and streamed_info == info


def test_cancelling_a_streamed_validation_stops_checking(
    stub: pb_grpc.FineTuneServiceStub, model_name: str, server: RunningServer
) -> None:
    write_jsonl(server.dataset_root / "big-cancel.jsonl", _qa_rows(BIG_ROWS))
    config = base_config(model_name, dataset="big-cancel.jsonl")
    call = stub.StreamValidateConfig(pb.StreamValidateConfigRequest(config=config), timeout=120)
    first = next(call)
    assert first.WhichOneof("kind") == "progress" and first.progress.records_estimated == BIG_ROWS
    call.cancel()
    stopped = wait_for_log_event(server, "dataset_check_stopped", dataset="big-cancel.jsonl")
    assert 0 < int(stopped["records_checked"]) < BIG_ROWS  # type: ignore[call-overload]
