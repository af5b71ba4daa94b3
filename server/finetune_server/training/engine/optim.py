"""The optimizer and the learning-rate schedule of a run, built from its resolved config."""

from __future__ import annotations

import math
from typing import Any

import torch

from finetune_server.training.config import TrainingConfig


def build_optimizer(
    config: TrainingConfig, params: list[torch.nn.Parameter], device: torch.device
) -> tuple[torch.optim.Optimizer, str | None]:
    """AdamW (decay on matrices only); bitsandbytes' PagedAdamW8bit when asked for and on CUDA.

    The second value is a warning for the user when the optimizer asked for could not be used.
    """
    lr = float(config.learning_rate if config.learning_rate is not None else 2e-4)
    decay = float(config.weight_decay or 0.0)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optim == "paged_adamw_8bit":
        if device.type == "cuda":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(groups, lr=lr), None
        return torch.optim.AdamW(groups, lr=lr), "paged_adamw_8bit needs a CUDA device: using torch AdamW instead"
    return torch.optim.AdamW(groups, lr=lr), None


def build_scheduler(config: TrainingConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """Linear warmup over `warmup_ratio` of the steps, then cosine or linear decay, or constant."""
    from transformers import get_scheduler

    warmup = math.ceil(float(config.warmup_ratio or 0.0) * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        config.lr_scheduler_type or "cosine"
    ]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
