"""Presets, recommendations and named devices: consistent with the config, the estimate and the contract."""

from __future__ import annotations

import dataclasses

import pytest

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.training.config import (
    DEFAULTS,
    OPTIMIZERS,
    LoraSettings,
    TrainingConfig,
    get_path,
    resolve,
)
from finetune_server.training.memory import estimate_memory
from finetune_server.training.model_info import ModelSummary, parameters_from_config
from finetune_server.training.presets import GIB, NAMED_DEVICES, PRESETS, RECOMMENDATIONS, get_preset


def _qwen25(h: int, i: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> dict[str, object]:
    """The published Qwen2.5 config.json values that matter here."""
    return {
        "model_type": "qwen2",
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }


QWEN25 = {
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": _qwen25(1536, 8960, 28, 12, 2, 151936, True),
    "Qwen/Qwen2.5-0.5B-Instruct": _qwen25(896, 4864, 24, 14, 2, 151936, True),
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen25(1536, 8960, 28, 12, 2, 151936, True),
    "Qwen/Qwen2.5-3B-Instruct": _qwen25(2048, 11008, 36, 16, 2, 151936, True),
    "Qwen/Qwen2.5-7B-Instruct": _qwen25(3584, 18944, 28, 28, 4, 152064, False),
}


def unset_field_paths() -> set[str]:
    """Every field path whose `None` means "not set" (the ones presets and defaults may fill)."""
    paths = {f.name for f in dataclasses.fields(TrainingConfig) if f.default is None}
    return paths | {f"lora.{f.name}" for f in dataclasses.fields(LoraSettings) if f.default is None}


def test_preset_fields_are_config_paths_and_fill_only_unset_fields() -> None:
    valid = unset_field_paths()
    for preset in PRESETS.values():
        assert set(preset.config) <= valid, preset.name
        resolved, filled = resolve(TrainingConfig(model_name="m", dataset="d"), preset.config)
        assert sorted(filled) == sorted(preset.config)
        for path, value in preset.config.items():
            assert get_path(resolved, path) == value
    explicit = TrainingConfig(model_name="m", dataset="d", max_length=333, gradient_checkpointing=False)
    resolved, filled = resolve(explicit, PRESETS["rtx_3060"].config)
    assert (resolved.max_length, resolved.gradient_checkpointing) == (333, False)  # never overridden
    assert "max_length" not in filled


def test_the_services_presets() -> None:
    assert list(PRESETS) == ["rtx_3060", "rtx_4090", "a100", "minimal"]
    rtx = PRESETS["rtx_3060"].config
    assert rtx["load_in_8bit"] and rtx["bf16"] and rtx["gradient_checkpointing"]
    assert (rtx["max_length"], rtx["per_device_train_batch_size"], rtx["gradient_accumulation_steps"]) == (1024, 1, 16)
    assert rtx["optim"] in OPTIMIZERS
    assert PRESETS["rtx_3060"].device_memory_bytes == 12 * GIB
    assert PRESETS["minimal"].config["lora.r"] == 8
    assert PRESETS["minimal"].device_memory_bytes == 0
    assert DEFAULTS["max_length"] > PRESETS["minimal"].config["max_length"]


def test_domain_types_match_the_contract() -> None:
    for cls, message in ((type(PRESETS["a100"]), pb.Preset), (type(RECOMMENDATIONS[0]), pb.ModelRecommendation)):
        assert [f.name for f in dataclasses.fields(cls)] == [f.name for f in message.DESCRIPTOR.fields]


def test_unknown_preset() -> None:
    assert get_preset("rtx_4090").name == "rtx_4090"
    with pytest.raises(FinetuneError) as info:
        get_preset("rtx_9090")
    error = info.value
    assert (error.kind, error.reason) == (ErrorKind.INVALID_ARGUMENT, "UNKNOWN_PRESET")
    assert error.violations[0].field == "preset"
    assert all(name in error.violations[0].message for name in PRESETS)


def test_named_devices() -> None:
    assert NAMED_DEVICES["rtx_3060"] == 12 * GIB
    assert NAMED_DEVICES["a100"] == NAMED_DEVICES["a100_40gb"] == 40 * GIB
    assert NAMED_DEVICES["h100_80gb"] == NAMED_DEVICES["a100_80gb"] == 80 * GIB


def test_recommendations_agree_with_the_estimate() -> None:
    assert RECOMMENDATIONS[0].model_name == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert [r.model_name for r in RECOMMENDATIONS] == list(QWEN25)
    for rec in RECOMMENDATIONS:
        model_config = QWEN25[rec.model_name]
        preset = get_preset(rec.preset)
        config, _ = resolve(TrainingConfig(model_name=rec.model_name, dataset="d"), preset.config)
        summary = ModelSummary(num_parameters=parameters_from_config(model_config))
        estimate = estimate_memory(
            config, summary, model_config, sequence_length=config.max_length or 0,
            devices=[(rec.preset, preset.device_memory_bytes)],
        )  # fmt: skip
        # min_gpu_memory_bytes is the estimate rounded up to half a GiB.
        assert estimate.total_bytes <= rec.min_gpu_memory_bytes < estimate.total_bytes + GIB // 2, rec.model_name
        fits = estimate.fits[0].fits
        assert fits == (rec.min_gpu_memory_bytes <= 0.9 * preset.device_memory_bytes), rec.model_name
        assert fits or rec.cautions, f"{rec.model_name} does not fit its preset and says nothing"
    seven_b = RECOMMENDATIONS[-1]
    assert any("load_in_4bit" in c for c in seven_b.cautions)
