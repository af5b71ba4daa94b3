"""Will vLLM serve this artifact, and with which command line?

Checked for adapters, from adapter_config.json alone (no torch), for what vLLM's LoRA loader refuses or ignores:
- DoRA (`use_dora`) and `modules_to_save`: vLLM loads neither (the served model would silently differ from the
  trained one, or fail to load). A MERGED export folds both into the weights, which is the fix we suggest.
- trained biases (`bias` other than "none"): recent vLLM releases dropped LoRA bias support.
- target modules outside `VLLM_LORA_MODULES`, the projection names of vLLM's LoRA-enabled architectures.
- the rank: vLLM serves an adapter of rank r under `--max-lora-rank M` for any r <= M, where M must be one of
  `VLLM_MAX_LORA_RANKS`; so only r > 512 (or a missing rank) is a problem, and the command names the smallest M >= r.

The serve command is a display string for people: every value is shell-quoted, nothing is ever executed.
For an adapter it also passes the trained chat template and the generation config (end-of-turn token as eos), since
vLLM otherwise takes both from the base model, which may not stop at the template's end of turn.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from finetune_server.storage.layout import CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE

# --max-lora-rank must be one of these (vllm/config/lora.py, `possible_max_ranks`, 0.6 onwards).
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)

# Module names vLLM's LoRA layers replace, by family: Llama/Qwen/Mistral/Gemma (q/k/v/o, gate/up/down), fused
# checkpoints (Phi-3: qkv_proj, gate_up_proj), GPT-NeoX/Falcon (query_key_value, dense, dense_h_to_4h/4h_to_h),
# GPT-2/StarCoder (c_attn, c_proj, c_fc), InternLM2 (wqkv, wo, w1/w2/w3), Phi-1/2 (fc1, fc2), Baichuan (W_pack).
VLLM_LORA_MODULES = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "qkv_proj",
        "gate_up_proj",
        "dense",
        "query_key_value",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "c_attn",
        "c_proj",
        "c_fc",
        "wqkv",
        "wo",
        "w1",
        "w2",
        "w3",
        "fc1",
        "fc2",
        "W_pack",
    }
)

ADAPTER = "adapter"
MERGED = "merged"


@dataclass(frozen=True)
class VllmReport:
    """The contract's VllmCompatibility: compatible when `problems` is empty."""

    compatible: bool
    problems: list[str] = field(default_factory=list)
    serve_command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VllmReport:
        return cls(
            compatible=bool(data.get("compatible")),
            problems=[str(p) for p in data.get("problems") or []],
            serve_command=str(data.get("serve_command") or ""),
        )


def serving_rank(r: int) -> int | None:
    """The smallest allowed --max-lora-rank that holds rank `r`, or None when none does."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= r), None)


def _module_name(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def adapter_problems(adapter_config: Mapping[str, Any]) -> list[str]:
    """Every reason vLLM would refuse (or silently mis-serve) this PEFT LoRA adapter."""
    problems: list[str] = []
    peft_type = str(adapter_config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        problems.append(f"peft_type {peft_type} is not LoRA: vLLM serves LoRA adapters only")
    r = adapter_config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(f"the adapter has no valid rank (r={r!r})")
    elif serving_rank(r) is None:
        problems.append(f"rank {r} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    if adapter_config.get("use_dora"):
        problems.append("DoRA (use_dora) adapters are not supported by vLLM: export MERGED weights instead")
    modules_to_save = adapter_config.get("modules_to_save") or []
    if modules_to_save:
        problems.append(
            f"modules_to_save ({', '.join(map(str, modules_to_save))}) is not supported by vLLM: "
            "export MERGED weights instead"
        )
    bias = adapter_config.get("bias") or "none"
    if bias != "none":
        problems.append(f"trained biases (bias={bias!r}) are not loaded by vLLM")
    targets = adapter_config.get("target_modules")
    if isinstance(targets, str):
        problems.append(f"target_modules is a pattern ({targets!r}): vLLM needs module names it knows")
    elif targets:
        unknown = sorted({_module_name(str(t)) for t in targets} - VLLM_LORA_MODULES)
        if unknown:
            problems.append(f"vLLM applies LoRA only to projection layers, not to {', '.join(unknown)}")
    else:
        problems.append("the adapter names no target_modules")
    return problems


def vllm_compatibility(
    adapter_config: Mapping[str, Any],
    fmt: str,
    *,
    artifact_name: str,
    base_model: str,
    artifact_path: str | None = None,
    files: Collection[str] = (),
) -> VllmReport:
    """Report for an ADAPTER (`fmt="adapter"`) or MERGED (`fmt="merged"`) artifact.

    `artifact_path` is where the artifact will be served from (default `./NAME`, where a download lands); `files` are
    the artifact's relative paths, so the adapter command passes its chat template and generation config when present.
    """
    path = artifact_path or f"./{artifact_name}"
    if fmt == MERGED:
        # The merged folder carries its template (tokenizer_config.json, chat_template.jinja) and generation config.
        return VllmReport(compatible=True, problems=[], serve_command=shlex.join(["vllm", "serve", path]))
    if fmt != ADAPTER:
        raise ValueError(f"unknown export format {fmt!r}")
    problems = adapter_problems(adapter_config)
    r = adapter_config.get("r")
    max_rank = serving_rank(r) if isinstance(r, int) and not isinstance(r, bool) and r > 0 else None
    args = ["vllm", "serve", base_model, "--enable-lora", "--lora-modules", f"{artifact_name}={path}"]
    args += ["--max-lora-rank", str(max_rank or VLLM_MAX_LORA_RANKS[-1])]
    if CHAT_TEMPLATE_FILE in files:
        args += ["--chat-template", f"{path.rstrip('/')}/{CHAT_TEMPLATE_FILE}"]
    if GENERATION_CONFIG_FILE in files:
        args += ["--generation-config", path]
    return VllmReport(compatible=not problems, problems=problems, serve_command=shlex.join(args))
