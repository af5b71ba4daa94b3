"""Continuing a job: a new job whose LoRA adapter starts from another job's, on new data or for more steps.

Validation asks a `SourceLookup` (the job service's: the store and the jobs' folders) for the adapter the config
names, then fills the config's unset LoRA shape and chat template from that job's, and checks what must match for
the weights to load and mean what they meant: the same base model and adapter shape. No torch here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune_server.errors import ConfigWarning, Violation
from finetune_server.training.config import TrainingConfig

# The adapter's shape: unset in the new config, each takes the source job's value; set, each must equal it (alpha
# only scales the update, so a different one is a warning).
SHAPE_FIELDS = ("r", "target_modules", "modules_to_save", "use_dora")


@dataclass(frozen=True)
class SourceAdapter:
    """The adapter a continued job starts from."""

    job_id: str
    step: int | None  # the checkpoint's step; None: the job's final adapter
    config: TrainingConfig  # the source job's resolved config
    adapter_dir: Path
    checkpoint_dir: Path | None  # the checkpoint holding that adapter's optimizer state, when one is kept


# (job id, checkpoint step or None) -> the adapter; raises FinetuneError whose violation names the config field.
SourceLookup = Callable[[str, int | None], SourceAdapter]


def request_problems(config: TrainingConfig) -> list[Violation]:
    """init_from_checkpoint and resume_optimizer only mean something with init_from_job."""
    problems = []
    if config.init_from_checkpoint is not None:
        if not config.init_from_job:
            problems.append(Violation("init_from_checkpoint", "NEEDS_JOB", "init_from_checkpoint needs init_from_job"))
        elif config.init_from_checkpoint < 1:
            message = f"must be a checkpoint's step (>= 1), got {config.init_from_checkpoint}"
            problems.append(Violation("init_from_checkpoint", "OUT_OF_RANGE", message))
    if config.resume_optimizer and not config.init_from_job:
        problems.append(Violation("resume_optimizer", "NEEDS_JOB", "resume_optimizer needs init_from_job"))
    return problems


def inherit(config: TrainingConfig, source: SourceAdapter) -> TrainingConfig:
    """A copy of `config` whose unset LoRA shape, alpha and chat template are the source job's (before presets
    and defaults, so a continued job needs to repeat none of them)."""
    lora = dataclasses.replace(config.lora)
    for name in (*SHAPE_FIELDS, "alpha"):
        if getattr(lora, name) in (None, []):
            value = getattr(source.config.lora, name)
            setattr(lora, name, list(value) if isinstance(value, list) else value)
    inherited = dataclasses.replace(config, lora=lora)
    if not inherited.chat_template:
        inherited.chat_template = source.config.chat_template  # the template the adapter learned
    return inherited


def mismatches(resolved: TrainingConfig, source: SourceAdapter) -> tuple[list[Violation], list[ConfigWarning]]:
    """What keeps the source adapter from loading into this job's model (INVALID_ARGUMENT each), and what only
    changes what it means (warnings)."""
    theirs, problems = source.config, []
    where = f"job {source.job_id}'s adapter"
    if resolved.model_name.strip() != theirs.model_name.strip():
        message = f"{where} was trained on {theirs.model_name!r}; a continued job trains the same base model"
        problems.append(Violation("model_name", "INIT_MODEL_MISMATCH", message))
    for name in SHAPE_FIELDS:
        mine, its = getattr(resolved.lora, name), getattr(theirs.lora, name)
        same = sorted(mine) == sorted(its) if isinstance(mine, list) else mine == its
        if not same:
            shown = its if its != [] else "[] (every linear module)"
            message = f"{where} has {name}={shown}, got {mine}: leave lora.{name} unset to take it"
            problems.append(Violation(f"lora.{name}", "INIT_ADAPTER_MISMATCH", message))
    if resolved.resume_optimizer and resolved.optim != theirs.optim:
        message = f"{where} was trained with optim {theirs.optim!r}; resuming its optimizer needs the same optim"
        problems.append(Violation("resume_optimizer", "INIT_OPTIMIZER_MISMATCH", message))
    warnings = []
    if resolved.lora.alpha != theirs.lora.alpha:
        message = (
            f"{where} has alpha={theirs.lora.alpha}, got {resolved.lora.alpha}: its update is scaled by alpha / r, so "
            "the job does not start from the model that job ended with"
        )
        warnings.append(ConfigWarning("lora.alpha", "INIT_ALPHA_DIFFERS", message))
    if resolved.resume_optimizer and source.checkpoint_dir is None:
        message = f"{where} has no checkpoint with its optimizer state: a fresh optimizer is used"
        warnings.append(ConfigWarning("resume_optimizer", "NO_OPTIMIZER_STATE", message))
    return problems, warnings
