"""The training config as the domain sees it: the contract's fields, `None` meaning "not set".

A preset fills only fields left unset; then the server defaults fill the rest. The resolved config has every field
set and is what a job records and a worker runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DATA_FORMATS = ("auto", "alpaca", "messages", "qa", "text")
LR_SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw_torch", "paged_adamw_8bit")


@dataclass
class LoraSettings:
    r: int | None = None
    alpha: int | None = None
    dropout: float | None = None
    target_modules: list[str] = field(default_factory=list)  # empty: every linear projection of the architecture
    modules_to_save: list[str] = field(default_factory=list)
    use_dora: bool | None = None


@dataclass
class EvalProbe:
    """A prompt every evaluation answers (a user message), and optionally the answer expected."""

    prompt: str = ""
    expected: str = ""


# Bounds of behaviour evaluation (validation enforces them): generation at every evaluation must stay a small part
# of a job's time, and the answers must fit in an event.
MAX_EVAL_PROBES = 32
MAX_EVAL_GENERATE_EXAMPLES = 64
MAX_EVAL_NEW_TOKENS = 512
MAX_PROBE_CHARS = 4096


@dataclass
class TrainingConfig:
    model_name: str = ""
    dataset: str = ""
    data_format: str | None = None
    max_length: int | None = None
    num_train_epochs: float | None = None
    max_steps: int | None = None
    learning_rate: float | None = None
    lr_scheduler_type: str | None = None
    warmup_ratio: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    gradient_checkpointing: bool | None = None
    load_in_8bit: bool | None = None
    load_in_4bit: bool | None = None
    fp16: bool | None = None
    bf16: bool | None = None
    optim: str | None = None
    seed: int | None = None
    preset: str = ""
    packing: bool | None = None
    eval_split: float | None = None
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None
    logging_steps: int | None = None
    early_stopping_patience: int | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    train_on_prompt: bool | None = None
    eval_dataset: str = ""
    chat_template: str = ""
    allow_fallback_chat_template: bool | None = None
    # Where in `dataset` / `eval_dataset` to read: a hub dataset's subset (config name), its split (also a
    # save_to_disk DatasetDict's) and revision; empty: the dataset's default subset, `train` (or its only split), main.
    dataset_subset: str = ""
    dataset_split: str = ""
    dataset_revision: str = ""
    skip_invalid_rows: bool | None = None
    eval_dataset_subset: str = ""
    eval_dataset_split: str = ""
    eval_dataset_revision: str = ""
    # Continue another job: its id, one of its checkpoints' steps (None: its final adapter), and whether that
    # checkpoint's optimizer state is continued too (`training/continuation.py`).
    init_from_job: str = ""
    init_from_checkpoint: int | None = None
    resume_optimizer: bool | None = None
    # Behaviour evaluation (`training/engine/behaviour.py`): held-out examples answered greedily at each evaluation,
    # probe prompts answered before training and at each evaluation, and the most tokens of one such answer.
    eval_generate_examples: int | None = None
    eval_probes: list[EvalProbe] = field(default_factory=list)
    eval_max_new_tokens: int | None = None

    def source_options(self, field: str = "dataset") -> dict[str, str]:
        """The subset, split and revision of `dataset` or `eval_dataset`, as DatasetSource takes them."""
        return {option: getattr(self, f"{field}_{option}") for option in ("subset", "split", "revision")}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Inverse of to_dict (used for persistence and the worker hand-off; input is our own output)."""
        values = dict(data)
        lora = LoraSettings(**values.pop("lora", {}) or {})
        probes = [EvalProbe(**probe) for probe in values.pop("eval_probes", None) or []]
        return cls(**values, lora=lora, eval_probes=probes)


# Server defaults for every optional field; `None` for lora.alpha means "2 * r", resolved below.
DEFAULTS: dict[str, Any] = {
    "data_format": "auto",
    "max_length": 2048,
    "num_train_epochs": 3.0,
    "max_steps": 0,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "load_in_8bit": False,
    "load_in_4bit": False,
    "fp16": False,
    "bf16": False,
    "optim": "adamw_torch",
    "seed": 42,
    "packing": False,
    "eval_split": 0.0,
    "eval_steps": 0,
    "save_steps": 100,
    "save_total_limit": 2,
    "logging_steps": 1,
    "early_stopping_patience": 0,
    "train_on_prompt": False,
    "allow_fallback_chat_template": True,
    "skip_invalid_rows": False,
    "resume_optimizer": False,
    "eval_generate_examples": 0,
    "eval_max_new_tokens": 64,
    "lora.r": 16,
    "lora.dropout": 0.05,
    "lora.use_dora": False,
}


def get_path(config: TrainingConfig, path: str) -> Any:
    """Value of a dotted field path such as `lora.r`."""
    target: Any = config
    for part in path.split("."):
        target = getattr(target, part)
    return target


def set_path(config: TrainingConfig, path: str, value: Any) -> None:
    *parents, name = path.split(".")
    target: Any = config
    for part in parents:
        target = getattr(target, part)
    setattr(target, name, value)


def resolve(config: TrainingConfig, preset_values: dict[str, Any] | None = None) -> tuple[TrainingConfig, list[str]]:
    """Fill unset fields from the preset, then from DEFAULTS. Returns the resolved copy and the preset-filled paths.

    Explicit values are never overridden: only fields that are `None` (or an empty list) are filled.
    """
    resolved = dataclasses.replace(config, lora=dataclasses.replace(config.lora))
    resolved.lora.target_modules = list(config.lora.target_modules)
    resolved.lora.modules_to_save = list(config.lora.modules_to_save)
    resolved.eval_probes = [dataclasses.replace(probe) for probe in config.eval_probes]
    filled: list[str] = []
    for path, value in (preset_values or {}).items():
        current = get_path(resolved, path)
        if current is None or current == []:
            set_path(resolved, path, list(value) if isinstance(value, list) else value)
            filled.append(path)
    for path, value in DEFAULTS.items():
        if get_path(resolved, path) is None:
            set_path(resolved, path, value)
    if resolved.lora.alpha is None:
        # 2 * r; for an r out of range (which validation reports) the default r's, so nothing overflows the contract.
        r = int(resolved.lora.r or 0)
        resolved.lora.alpha = 2 * (r if 1 <= r <= 1 << 20 else int(DEFAULTS["lora.r"]))
    return resolved, filled
