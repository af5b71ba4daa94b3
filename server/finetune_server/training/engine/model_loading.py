"""Load a base model for LoRA training: local folder or hub id, dtype by device, 8/4-bit, checkpointing, PEFT.

The order follows PEFT's guidance for quantised training: load with a BitsAndBytesConfig, then
`prepare_model_for_kbit_training` (freezes the base, upcasts norms to fp32), then `get_peft_model`. Gradient
checkpointing is always non-reentrant (`use_reentrant=False`): it needs no `enable_input_require_grads` hack and
works with frozen embeddings and DDP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from finetune_server.errors import ErrorKind, FinetuneError, Violation
from finetune_server.training.config import TrainingConfig
from finetune_server.training.model_source import resolve_model_dir

log = structlog.get_logger(__name__)

_GC_KWARGS = {"use_reentrant": False}


def compute_dtype(config: TrainingConfig, device: torch.device) -> torch.dtype:
    """fp32 on CPU always (bf16 there is ~58x slower); bf16 or fp16 on CUDA when the config asks."""
    if device.type != "cuda":
        return torch.float32
    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    return torch.float32


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the linear projections inside the repeated decoder layers (q_proj, ..., down_proj).

    A module counts when it is an nn.Linear (bitsandbytes' Linear8bitLt/Linear4bit subclass it) under an indexed
    layer list (`layers.3.`), which leaves out lm_head, embeddings and any projection outside the decoder stack.
    """
    names: set[str] = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear) and any(p.isdigit() for p in parts[:-1]) and parts[-1] != "lm_head":
            names.add(parts[-1])
    return sorted(names)


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    module_names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in module_names)]
    if missing:
        available = linear_module_names(model)
        raise FinetuneError(
            ErrorKind.INVALID_ARGUMENT,
            "TARGET_MODULES_NOT_FOUND",
            f"lora.target_modules: the model has no module named {', '.join(missing)}; "
            f"its linear projections are {', '.join(available)}",
            violations=[
                Violation("lora.target_modules", "TARGET_MODULES_NOT_FOUND", f"no module named {t!r}") for t in missing
            ],
            hint=f"Leave target_modules empty to adapt every linear projection ({', '.join(available)}).",
        )


def _quantization_config(config: TrainingConfig, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if config.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_for_training(
    config: TrainingConfig,
    model_ref: str | Path,
    *,
    device: torch.device | str,
    cache_dir: Path | None = None,
) -> tuple[Any, Path]:
    """The PEFT model on `device` in train mode (only the adapter trainable), and the folder with the tokenizer."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    model_dir = resolve_model_dir(model_ref, cache_dir=cache_dir)
    dtype = compute_dtype(config, device)
    quantization = _quantization_config(config, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if quantization is not None:
        # bitsandbytes quantises while loading, on the target device.
        kwargs.update(quantization_config=quantization, device_map={"": device})
    log.info("loading model", model=str(model_ref), dtype=str(dtype), device=str(device), quantized=bool(quantization))
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantization is None:
        model = model.to(device)
    model.config.use_cache = False  # no KV cache in training (and packing's mask detection needs it off)

    targets = list(config.lora.target_modules) or linear_module_names(model)
    _check_targets(model, targets)

    if quantization is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(config.gradient_checkpointing),
            gradient_checkpointing_kwargs=_GC_KWARGS,
        )
    elif config.gradient_checkpointing:
        # transformers 5 renamed it (the old name warns); keep working on either side of the rename.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=_GC_KWARGS)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_GC_KWARGS)

    peft_model = add_lora(model, config, targets)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("lora ready", targets=targets, trainable_params=trainable, total_params=total)
    return peft_model, model_dir


def add_lora(model: nn.Module, config: TrainingConfig, targets: list[str]) -> Any:
    """The PEFT model in train mode, with every trainable parameter in fp32.

    peft upcasts the LoRA matrices of a 16-bit base itself, but not the full copies `modules_to_save` makes: those
    stay fp16/bf16, and under fp16 `GradScaler.unscale_` refuses their gradients ("Attempting to unscale FP16
    gradients") at the first step; in bf16 their small AdamW updates would round away. The optimizer's master
    weights are fp32 in every case; autocast runs the matmuls in 16-bit.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=int(config.lora.r or 16),
        lora_alpha=int(config.lora.alpha or 2 * int(config.lora.r or 16)),
        lora_dropout=float(config.lora.dropout or 0.0),
        target_modules=targets,
        modules_to_save=list(config.lora.modules_to_save) or None,
        use_dora=bool(config.lora.use_dora),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    for param in peft_model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    peft_model.train()
    return peft_model
