"""Will vLLM serve this artifact, and with which command line?

For an adapter the verdict is `training.vllm_rules`' rule (the one ValidateConfig applies to the training config),
judged from adapter_config.json alone (no torch). MERGED weights always serve: the merge folds DoRA and
`modules_to_save` into the weights, which is the fix the problems suggest.

The serve command is a display string for people: every value is shell-quoted, nothing is ever executed.
For an adapter it names the smallest allowed --max-lora-rank holding its rank, and passes the trained chat template
and the generation config (end-of-turn token as eos), since vLLM otherwise takes both from the base model, which may
not stop at the template's end of turn.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from finetune_server.export.formats import ExportFormat
from finetune_server.storage.layout import CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE
from finetune_server.training.vllm_rules import VLLM_MAX_LORA_RANKS, lora_serving_problems, serving_rank, valid_rank


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


def adapter_problems(adapter_config: Mapping[str, Any]) -> list[str]:
    """Every reason vLLM would refuse (or silently mis-serve) this PEFT adapter (an adapter_config.json's dict)."""
    targets = adapter_config.get("target_modules")
    problems = lora_serving_problems(
        r=adapter_config.get("r"),
        use_dora=bool(adapter_config.get("use_dora")),
        modules_to_save=adapter_config.get("modules_to_save") or [],
        target_modules=[] if targets is None else targets,  # an adapter without targets adapts nothing
        bias=str(adapter_config.get("bias") or "none"),
        peft_type=str(adapter_config.get("peft_type") or "LORA"),
    )
    return [p.message for p in problems]


def vllm_compatibility(
    adapter_config: Mapping[str, Any],
    fmt: str,
    *,
    artifact_name: str,
    base_model: str,
    artifact_path: str | None = None,
    files: Collection[str] = (),
) -> VllmReport:
    """Report for an ADAPTER or MERGED artifact (`fmt`: an ExportFormat or its value).

    `artifact_path` is where the artifact will be served from (default `./NAME`, where a download lands); `files` are
    the artifact's relative paths, so the adapter command passes its chat template and generation config when present.
    """
    path = artifact_path or f"./{artifact_name}"
    if fmt == ExportFormat.MERGED:
        # The merged folder carries its template (tokenizer_config.json, chat_template.jinja) and generation config.
        return VllmReport(compatible=True, problems=[], serve_command=shlex.join(["vllm", "serve", path]))
    if fmt != ExportFormat.ADAPTER:
        raise ValueError(f"unknown export format {fmt!r}")
    problems = adapter_problems(adapter_config)
    rank = valid_rank(adapter_config.get("r"))
    max_rank = serving_rank(rank) if rank is not None else None
    args = ["vllm", "serve", base_model, "--enable-lora", "--lora-modules", f"{artifact_name}={path}"]
    args += ["--max-lora-rank", str(max_rank or VLLM_MAX_LORA_RANKS[-1])]
    if CHAT_TEMPLATE_FILE in files:
        args += ["--chat-template", f"{path.rstrip('/')}/{CHAT_TEMPLATE_FILE}"]
    if GENERATION_CONFIG_FILE in files:
        args += ["--generation-config", path]
    return VllmReport(compatible=not problems, problems=problems, serve_command=shlex.join(args))
