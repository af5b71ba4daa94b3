"""Will vLLM serve a LoRA adapter? The one rule, judged by ValidateConfig from the training config and by Export from
the adapter_config.json training wrote, so the two never disagree.

What vLLM's LoRA loader refuses or ignores:
- DoRA (`use_dora`) and `modules_to_save`: vLLM loads neither (the served model would silently differ from the
  trained one, or fail to load). A MERGED export folds both into the weights, which is the fix we suggest.
- trained biases (`bias` other than "none"): recent vLLM releases dropped LoRA bias support.
- target modules outside `VLLM_LORA_MODULES`, the projection names of vLLM's LoRA-enabled architectures.
- the rank: vLLM serves an adapter of rank r under `--max-lora-rank M` for any r <= M, where M must be one of
  `VLLM_MAX_LORA_RANKS`; so only r > 512 (or a missing rank) is a problem: rank 12 serves under --max-lora-rank 16.

Stdlib only: it runs on the ValidateConfig path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from finetune_server.training.model_families import VLLM_LORA_MODULES

# --max-lora-rank must be one of these (vllm/config/lora.py, `possible_max_ranks`, 0.6 onwards).
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class ServingProblem:
    """One reason vLLM would refuse (or silently mis-serve) an adapter; ValidateConfig warns with it."""

    field: str  # the training config field it comes from ("lora.r"); "" when no field sets it
    reason: str  # VLLM_...
    message: str


def serving_rank(r: int) -> int | None:
    """The smallest allowed --max-lora-rank that holds rank `r`, or None when none does."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= r), None)


def valid_rank(r: object) -> int | None:
    """`r` when it is a usable LoRA rank (a positive int), else None."""
    return r if isinstance(r, int) and not isinstance(r, bool) and r > 0 else None


def _module_name(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def lora_serving_problems(
    *,
    r: object,
    use_dora: bool,
    modules_to_save: Sequence[str],
    target_modules: Sequence[str] | str | None,
    bias: str = "none",
    peft_type: str = "LORA",
) -> list[ServingProblem]:
    """Every reason vLLM would not serve a LoRA adapter of this configuration; empty when it serves.

    `target_modules`: the module names (or a peft regex) the adapter applies to; None when they are not known yet
    (every linear module of an architecture the service does not describe), which leaves them unjudged.
    """
    problems: list[ServingProblem] = []
    if peft_type.upper() != "LORA":
        problems.append(
            ServingProblem("", "VLLM_NOT_LORA", f"peft_type {peft_type} is not LoRA: vLLM serves LoRA adapters only")
        )
    rank = valid_rank(r)
    if rank is None:
        problems.append(ServingProblem("lora.r", "VLLM_UNSUPPORTED_RANK", f"the adapter has no valid rank (r={r!r})"))
    elif serving_rank(rank) is None:
        largest = VLLM_MAX_LORA_RANKS[-1]
        message = f"rank {rank} exceeds vLLM's largest --max-lora-rank ({largest}): export MERGED weights instead"
        problems.append(ServingProblem("lora.r", "VLLM_UNSUPPORTED_RANK", message))
    if use_dora:
        message = "DoRA (use_dora) adapters are not supported by vLLM: export MERGED weights instead"
        problems.append(ServingProblem("lora.use_dora", "VLLM_DORA", message))
    if modules_to_save:
        message = (
            f"modules_to_save ({', '.join(map(str, modules_to_save))}) is not supported by vLLM: "
            "export MERGED weights instead"
        )
        problems.append(ServingProblem("lora.modules_to_save", "VLLM_MODULES_TO_SAVE", message))
    if bias != "none":
        problems.append(ServingProblem("", "VLLM_BIAS", f"trained biases (bias={bias!r}) are not loaded by vLLM"))
    target_problem = _target_problem(target_modules)
    if target_problem:
        problems.append(ServingProblem("lora.target_modules", "VLLM_TARGET_MODULES", target_problem))
    return problems


def _target_problem(targets: Sequence[str] | str | None) -> str:
    if targets is None:
        return ""
    if isinstance(targets, str):
        return f"target_modules is a pattern ({targets!r}): vLLM needs module names it knows"
    if not targets:
        return "the adapter names no target_modules"
    unknown = sorted({_module_name(str(t)) for t in targets} - VLLM_LORA_MODULES)
    return f"vLLM applies LoRA only to projection layers, not to {', '.join(unknown)}" if unknown else ""
