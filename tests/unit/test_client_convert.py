"""dict <-> TrainingConfig conversion, driven by the descriptors."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client.convert import (
    ConfigConversionError,
    config_from_dict,
    config_to_dict,
    dict_to_message,
    message_to_dict,
    train_result_from_job,
    validation_result_from_report,
)

# Every key of a config dict with a non-default value, so that a dropped field cannot go unnoticed.
FULL_CONFIG: dict[str, Any] = {
    "model_name": "Qwen/Qwen2.5-0.5B-Instruct",
    "dataset": "data/train.jsonl",
    "data_format": "alpaca",
    "max_length": 1024,
    "num_train_epochs": 2.5,
    "max_steps": 300,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "linear",
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "max_grad_norm": 0.5,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 8,
    "gradient_checkpointing": True,
    "load_in_8bit": False,
    "load_in_4bit": True,
    "fp16": True,
    "bf16": False,
    "optim": "paged_adamw_8bit",
    "seed": 1234,
    "preset": "rtx_3060",
    "packing": True,
    "eval_split": 0.1,
    "eval_steps": 50,
    "save_steps": 25,
    "save_total_limit": 3,
    "logging_steps": 5,
    "early_stopping_patience": 2,
    "lora": {
        "r": 8,
        "alpha": 16,
        "dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["lm_head"],
        "use_dora": True,
    },
    "train_on_prompt": True,
    "eval_dataset": "data/eval.jsonl",
    "chat_template": "{{ messages }}",
    "allow_fallback_chat_template": False,
    "dataset_subset": "default",
    "dataset_split": "train",
    "dataset_revision": "main",
    "skip_invalid_rows": True,
    "eval_dataset_subset": "other",
    "eval_dataset_split": "test",
    "eval_dataset_revision": "v1",
    "init_from_job": "job-0123456789abcdef",
    "init_from_checkpoint": 200,
    "resume_optimizer": True,
    "eval_generate_examples": 8,
    "eval_probes": [{"prompt": "What is the capital of France?", "expected": "Paris."}, {"prompt": "Hello?"}],
    "eval_max_new_tokens": 32,
}


def test_full_config_covers_every_contract_field() -> None:
    assert set(FULL_CONFIG) == set(pb.TrainingConfig.DESCRIPTOR.fields_by_name)
    assert set(FULL_CONFIG["lora"]) == set(pb.LoraConfig.DESCRIPTOR.fields_by_name)


def test_every_config_key_round_trips() -> None:
    message = config_from_dict(FULL_CONFIG)
    assert message.max_length == 1024
    assert message.lora.target_modules == ["q_proj", "v_proj"]
    assert message.HasField("load_in_8bit") and message.load_in_8bit is False
    assert config_to_dict(message) == FULL_CONFIG
    assert config_from_dict(config_to_dict(message)) == message


def test_unknown_key_suggests_the_closest_field() -> None:
    with pytest.raises(ConfigConversionError) as info:
        config_from_dict({"model_name": "m", "lerning_rate": 1e-4})
    assert info.value.problems == ["lerning_rate: unknown key (did you mean 'learning_rate'?)"]
    assert info.value.violations[0].reason == "UNKNOWN_FIELD"


def test_unknown_nested_key_has_its_path_and_suggestion() -> None:
    with pytest.raises(ConfigConversionError) as info:
        config_from_dict({"lora": {"alpah": 8}})
    assert info.value.problems == ["lora.alpah: unknown key (did you mean 'lora.alpha'?)"]


def test_unknown_key_without_any_close_field_has_no_suggestion() -> None:
    with pytest.raises(ConfigConversionError) as info:
        config_from_dict({"zzzzqqq": 1})
    assert info.value.problems == ["zzzzqqq: unknown key"]


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigConversionError) as info:
        config_from_dict(
            {
                "max_lenght": 512,
                "max_length": "1024",
                "fp16": 1,
                "lora": {"r": True, "target_modules": "q_proj"},
                "seed": 2**70,
            }
        )
    problems = info.value.problems
    assert problems == [
        "max_lenght: unknown key (did you mean 'max_length'?)",
        "max_length: expected an integer, got str '1024'",
        "fp16: expected a boolean, got int 1",
        "lora.r: expected an integer, got bool True",
        "lora.target_modules: expected a list of strings, got str 'q_proj'",
        f"seed: {2**70} is out of range for int64 [{-(2**63)}, {2**63 - 1}]",
    ]
    assert str(info.value).startswith("invalid training config (6 problems): max_lenght")
    assert isinstance(info.value, ValueError)


def test_int32_bounds() -> None:
    assert config_from_dict({"max_steps": 2**31 - 1}).max_steps == 2**31 - 1
    with pytest.raises(ConfigConversionError) as info:
        config_from_dict({"max_steps": 2**31})
    assert info.value.problems == [f"max_steps: {2**31} is out of range for int32 [{-(2**31)}, {2**31 - 1}]"]


def test_ints_are_accepted_for_floats_but_bools_are_not() -> None:
    message = config_from_dict({"num_train_epochs": 3})
    assert message.num_train_epochs == 3.0
    assert isinstance(config_to_dict(message)["num_train_epochs"], float)
    with pytest.raises(ConfigConversionError) as info:
        config_from_dict({"learning_rate": False})
    assert info.value.problems == ["learning_rate: expected a number, got bool False"]


def test_repeated_items_are_checked_one_by_one() -> None:
    with pytest.raises(ConfigConversionError) as info:
        config_from_dict({"lora": {"target_modules": ["q_proj", 3]}})
    assert info.value.problems == ["lora.target_modules[1]: expected a string, got int 3"]
    assert config_from_dict({"lora": {"target_modules": ("q_proj",)}}).lora.target_modules == ["q_proj"]


def test_nested_message_must_be_a_mapping() -> None:
    with pytest.raises(ConfigConversionError) as info:
        config_from_dict({"lora": 8})
    assert info.value.problems == ["lora: expected a mapping, got int 8"]


def test_none_means_unset() -> None:
    message = config_from_dict({"model_name": "m", "max_length": None, "fp16": None, "lora": None})
    assert not message.HasField("max_length")
    assert not message.HasField("fp16")
    assert not message.HasField("lora")
    assert config_to_dict(message) == {"model_name": "m"}


def test_optional_presence_keeps_explicit_zero_and_false() -> None:
    message = config_from_dict({"max_steps": 0, "gradient_checkpointing": False, "weight_decay": 0.0})
    assert message.HasField("max_steps") and message.HasField("gradient_checkpointing")
    assert config_to_dict(message) == {"max_steps": 0, "gradient_checkpointing": False, "weight_decay": 0.0}
    assert config_to_dict(pb.TrainingConfig()) == {}


def test_empty_lora_dict_marks_presence() -> None:
    message = config_from_dict({"lora": {}})
    assert message.HasField("lora")
    assert config_to_dict(message) == {"lora": {}}


def test_enums_accept_short_and_full_names_and_reject_others() -> None:
    request = dict_to_message({"states": ["running", "JOB_STATE_QUEUED", pb.JOB_STATE_FAILED]}, pb.ListJobsRequest)
    assert list(request.states) == [pb.JOB_STATE_RUNNING, pb.JOB_STATE_QUEUED, pb.JOB_STATE_FAILED]
    with pytest.raises(ConfigConversionError) as info:
        dict_to_message({"states": ["sleeping"]}, pb.ListJobsRequest)
    assert "states[0]: expected one of queued, running, succeeded, failed, cancelled" in info.value.problems[0]
    assert "ListJobsRequest" in str(info.value)


def test_message_to_dict_keeps_int64_as_int_and_names_enums() -> None:
    job = pb.Job(id="job-1", state=pb.JOB_STATE_SUCCEEDED, last_sequence=2**40)
    job.result.trained_tokens = 12345678901
    job.result.train_runtime.FromSeconds(90)
    job.result.metrics["tokens_per_second"] = 12.5
    job.create_time.FromJsonString("2025-01-02T03:04:05Z")
    as_dict = message_to_dict(job)
    assert as_dict["state"] == "succeeded"
    assert as_dict["last_sequence"] == 2**40 and isinstance(as_dict["last_sequence"], int)
    assert as_dict["result"]["trained_tokens"] == 12345678901
    assert as_dict["result"]["train_runtime"] == 90.0
    assert as_dict["result"]["metrics"] == {"tokens_per_second": 12.5}
    assert as_dict["create_time"] == "2025-01-02T03:04:05Z"
    assert "final_eval_loss" not in as_dict["result"]  # optional and unset
    assert "error" not in as_dict  # message field, unset
    assert as_dict["resume_count"] == 0  # no presence: always there


def test_validation_result_from_report() -> None:
    report = pb.ValidateConfigResponse(valid=False)
    report.violations.add(field="lora.r", reason="OUT_OF_RANGE", message="must be >= 1")
    report.violations.add(field="dataset", reason="BAD_LINE", message="missing 'output'", line=7)
    report.warnings.add(field="lora.use_dora", reason="VLLM_UNSUPPORTED", message="vLLM cannot serve DoRA")
    report.resolved_config.max_length = 2048
    report.dataset.num_examples = 10
    result = validation_result_from_report(report)
    assert result.valid is False
    assert result.errors == ["lora.r: must be >= 1", "dataset: line 7: missing 'output'"]
    assert result.violations[1].line == 7
    assert result.warnings == ["lora.use_dora: vLLM cannot serve DoRA"]
    assert result.resolved_config == {"max_length": 2048}
    assert result.dataset is not None and result.dataset["num_examples"] == 10
    assert result.memory_estimate is None and result.model is None


def test_train_result_from_failed_job_carries_the_error_text() -> None:
    job = pb.Job(id="job-9", state=pb.JOB_STATE_FAILED)
    job.error.reason = "OUT_OF_MEMORY"
    job.error.message = "CUDA out of memory"
    job.error.hint = "lower per_device_train_batch_size"
    job.progress.step = 12
    result = train_result_from_job(job)
    assert (result.success, result.state, result.steps) == (False, "failed", 12)
    assert result.error == "OUT_OF_MEMORY: CUDA out of memory (hint: lower per_device_train_batch_size)"
    assert result["error"] == result.error and dict(result)["job_id"] == "job-9"


@given(
    max_length=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    lr=st.floats(allow_nan=False, allow_infinity=False),
    packing=st.booleans(),
    modules=st.lists(st.text(max_size=8), min_size=1, max_size=4),  # an empty list is "unset"
)
def test_round_trip_property(max_length: int, lr: float, packing: bool, modules: list[str]) -> None:
    data = {"max_length": max_length, "learning_rate": lr, "packing": packing, "lora": {"target_modules": modules}}
    assert config_to_dict(config_from_dict(data)) == data
