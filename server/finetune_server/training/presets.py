"""The service's presets, model recommendations and named devices.

A preset is a dict of dotted field paths -> values, exactly what `config.resolve()` takes: it fills only the fields
the caller left unset and never overrides an explicit value. Presets and estimates advise; they never override.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune_server.errors import ErrorKind, FinetuneError, Violation

GIB = 1 << 30

# Named devices a caller may judge a config against (ValidateConfigRequest.target_device), in bytes.
NAMED_DEVICES: dict[str, int] = {
    "rtx_3060": 12 * GIB,
    "rtx_4090": 24 * GIB,
    "a100_40gb": 40 * GIB,
    "a100_80gb": 80 * GIB,
    "h100_80gb": 80 * GIB,
    "a100": 40 * GIB,  # alias: the smaller A100, so an estimate that fits here fits both
}


@dataclass
class Preset:
    """The contract's Preset; `config` holds dotted field paths (the API layer builds the TrainingConfig)."""

    name: str = ""
    description: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    device_memory_bytes: int = 0


@dataclass
class ModelRecommendation:
    """The contract's ModelRecommendation."""

    model_name: str = ""
    description: str = ""
    preset: str = ""
    min_gpu_memory_bytes: int = 0
    cautions: list[str] = field(default_factory=list)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="rtx_3060",
            description=(
                "12 GB consumer card (Ampere, compute 8.6): 8-bit base weights, bf16, gradient checkpointing, "
                "paged 8-bit AdamW, batch 1 x 16 accumulation steps, 1024 tokens."
            ),
            config={
                "load_in_8bit": True,
                "bf16": True,
                "max_length": 1024,
                "per_device_train_batch_size": 1,
                "gradient_accumulation_steps": 16,
                "gradient_checkpointing": True,
                "optim": "paged_adamw_8bit",
            },
            device_memory_bytes=NAMED_DEVICES["rtx_3060"],
        ),
        Preset(
            name="rtx_4090",
            description="24 GB card (Ada): 16-bit bf16 weights, gradient checkpointing, batch 4 x 4, 2048 tokens.",
            config={
                "bf16": True,
                "max_length": 2048,
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 4,
                "gradient_checkpointing": True,
            },
            device_memory_bytes=NAMED_DEVICES["rtx_4090"],
        ),
        Preset(
            name="a100",
            description="A100 40/80 GB: bf16, batch 8 x 2, 4096 tokens, no checkpointing (faster steps).",
            config={
                "bf16": True,
                "max_length": 4096,
                "per_device_train_batch_size": 8,
                "gradient_accumulation_steps": 2,
            },
            device_memory_bytes=NAMED_DEVICES["a100"],
        ),
        Preset(
            name="minimal",
            description="Smoke tests on any device, the CPU included: 512 tokens, batch 1, no accumulation, LoRA r 8.",
            config={
                "max_length": 512,
                "per_device_train_batch_size": 1,
                "gradient_accumulation_steps": 1,
                "lora.r": 8,
            },
            device_memory_bytes=0,
        ),
    )
}


def get_preset(name: str, field_path: str = "preset") -> Preset:
    preset = PRESETS.get(name)
    if preset is None:
        names = ", ".join(PRESETS)
        message = f"unknown preset {name!r}; known presets: {names}"
        raise FinetuneError(
            ErrorKind.INVALID_ARGUMENT,
            "UNKNOWN_PRESET",
            f"{field_path}: {message}",
            violations=[Violation(field_path, "UNKNOWN_PRESET", message)],
            hint="Call ListPresets to see the presets, or leave the preset empty.",
        )
    return preset


# Best first for the reference 12 GB card. min_gpu_memory_bytes: the memory estimate of each model with its preset
# (rounded up to 0.5 GiB); tests/unit/test_presets.py recomputes it from the models' published configs.
RECOMMENDATIONS: list[ModelRecommendation] = [
    ModelRecommendation(
        model_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        description="The best fit for a 12 GB card: code-tuned, ChatML template, trains comfortably in 8-bit.",
        preset="rtx_3060",
        min_gpu_memory_bytes=int(8.0 * GIB),
    ),
    ModelRecommendation(
        model_name="Qwen/Qwen2.5-0.5B-Instruct",
        description="Quick experiments: minutes per epoch on small datasets, fits any recent GPU.",
        preset="rtx_3060",
        min_gpu_memory_bytes=int(5.5 * GIB),
        cautions=["small: learns formats and facts, weaker at reasoning than the 1.5B"],
    ),
    ModelRecommendation(
        model_name="Qwen/Qwen2.5-1.5B-Instruct",
        description="General-purpose chat model of the same size as the Coder one.",
        preset="rtx_3060",
        min_gpu_memory_bytes=int(8.0 * GIB),
    ),
    ModelRecommendation(
        model_name="Qwen/Qwen2.5-3B-Instruct",
        description="Stronger, still trainable on 12 GB in 8-bit with short sequences.",
        preset="rtx_3060",
        min_gpu_memory_bytes=int(11.0 * GIB),
        cautions=[
            "expect ~2x slower steps than the 1.5B",
            "over 90% of 12 GB at the preset's 1024 tokens: max_length 768 or less fits (estimated 9.5 GiB)",
        ],
    ),
    ModelRecommendation(
        model_name="Qwen/Qwen2.5-7B-Instruct",
        description="The strongest of the family; needs a 16 GB card or more, even with 4-bit QLoRA.",
        preset="rtx_3060",
        min_gpu_memory_bytes=int(20.0 * GIB),
        cautions=[
            "does not fit 12 GB with the rtx_3060 preset, nor with load_in_4bit (about 13 GiB then: 4-bit training "
            "keeps fp32 copies of the 152k-token embeddings and lm_head, 4.4 GB)",
            "expect ~4-5x slower steps than the 1.5B; 4-bit also lowers quality slightly",
            "merge onto a 16-bit copy of the base (needs ~16 GB of host memory)",
        ],
    ),
]
