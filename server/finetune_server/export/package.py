"""Turn a job's adapter (final, or one checkpoint's) into an artifact folder that serves the way it was trained.

ADAPTER: adapter_config.json + adapter_model.safetensors, the tokenizer files, `chat_template.jinja` (the template
trained with, also in tokenizer_config.json) and a `generation_config.json` whose eos includes the template's
end-of-turn token.
MERGED: the adapter folded into a copy of the base in the base's own dtype (a bf16 base merges and ships as bf16,
an fp32 one as fp32, whatever device merges it), on the CPU unless the caller names a device (a GPU is the training
slots': a merge there could push a running job out of memory), never a quantised one even when training used
8-bit or 4-bit (merging into rounded weights degrades the model), saved as safetensors shards with the same
tokenizer files, template and generation config. It loads with plain
`AutoModelForCausalLM.from_pretrained(dir)`: no peft, no bitsandbytes.

Why the generation config: a base model's eos is often `<|endoftext|>` while the chat template ends a turn with
`<|im_end|>`; a server that stops only at the former never stops (the bug of the tool this replaces).

The folder is built in a staging folder next to the target, every file fsynced, then renamed into place, so a
reader sees the whole artifact or none. Checkpoints are found by their integer step, never by name order.
torch, transformers and peft are imported only inside the functions that need them: the export worker's server half
imports this module for its types and must stay light.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.export.formats import ExportFormat
from finetune_server.export.vllm import VllmReport, vllm_compatibility
from finetune_server.storage import layout
from finetune_server.training.data.template import (
    CHAT_TEMPLATE_FILE,
    TemplateError,
    choose_chat_template,
    render,
    save_tokenizer_files,
)
from finetune_server.training.model_source import resolve_model_dir
from finetune_server.util.hashing import sha256_file
from finetune_server.util.json_values import read_json_object

log = structlog.get_logger(__name__)

DEFAULT_MAX_SHARD_SIZE = "2GB"

OnProgress = Callable[[str, float, str], None]


@dataclass(frozen=True)
class ArtifactFile:
    path: str  # relative to the artifact root, `/` separators
    size_bytes: int
    sha256: str  # lower-case hex


@dataclass
class ArtifactManifest:
    """What an export produced; mirrors the contract's Artifact (without the server-assigned id and times)."""

    format: str
    step: int
    base_model: str
    files: list[ArtifactFile] = field(default_factory=list)
    total_size_bytes: int = 0
    vllm: VllmReport = field(default_factory=lambda: VllmReport(compatible=False))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "step": self.step,
            "base_model": self.base_model,
            "files": [{"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in self.files],
            "total_size_bytes": self.total_size_bytes,
            "vllm": self.vllm.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactManifest:
        return cls(
            format=str(data["format"]),
            step=int(data["step"]),
            base_model=str(data["base_model"]),
            files=[ArtifactFile(str(f["path"]), int(f["size_bytes"]), str(f["sha256"])) for f in data["files"]],
            total_size_bytes=int(data["total_size_bytes"]),
            vllm=VllmReport.from_dict(data.get("vllm") or {}),
        )


def staging_prefix(target_dir: Path) -> str:
    """Name prefix of the staging folders of an export to `target_dir` (in its parent), for cleanup after a crash."""
    return f".tmp-{target_dir.name}-"


def remove_staging(target_dir: Path) -> list[Path]:
    """Remove staging folders a killed export to `target_dir` left behind (only when none is running)."""
    parent = Path(target_dir).parent
    if not parent.is_dir():
        return []
    stale = [p for p in parent.iterdir() if p.name.startswith(staging_prefix(Path(target_dir))) and p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def export_artifact(
    *,
    job_dir: Path,
    config: Mapping[str, Any],
    model_ref: str,
    fmt: str,
    checkpoint_step: int | None,
    target_dir: Path,
    on_progress: OnProgress,
    hub_cache_dir: Path | None = None,
    hub_offline: bool | None = None,
    device: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    artifact_name: str | None = None,
    serve_path: str | None = None,
    base_model: str | None = None,
) -> ArtifactManifest:
    """Build the artifact at `target_dir` (replacing one there) and return its manifest.

    `fmt` is an ExportFormat or its value. `config` is the job's resolved TrainingConfig as a dict (its
    chat_template settings count when the job has no final adapter to take the template from). `device` where a merge
    runs, None: the CPU. `artifact_name` and `serve_path` only shape the vLLM serve command (defaults: the target
    folder's name, `./NAME`); `base_model` is the base's name for people and for `vllm serve` (default `model_ref`,
    which may be this server's local path).
    Raises FinetuneError: NOT_FOUND (ADAPTER_NOT_FOUND, CHECKPOINT_NOT_FOUND), INVALID_ARGUMENT (EXPORT_FORMAT),
    FAILED_PRECONDITION (BASE_QUANTIZED), and the model lookup's errors.
    """
    export_format = ExportFormat.parse(fmt)
    job_dir, target_dir = Path(job_dir), Path(target_dir)
    bound = log.bind(job_dir=str(job_dir), format=export_format.value, checkpoint_step=checkpoint_step)
    adapter_dir, step = find_adapter(job_dir, checkpoint_step)
    adapter_config = json.loads((adapter_dir / layout.ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    source = _Source(job_dir, config, adapter_dir, model_ref, hub_cache_dir, hub_offline)
    base_model = base_model or model_ref

    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target_dir.parent, prefix=staging_prefix(target_dir)))
    try:
        _write_artifact(staging, export_format, source, on_progress, device=device, max_shard_size=max_shard_size)
        files = checksum_files(staging, on_progress, start=0.8, end=0.99)
        vllm = vllm_compatibility(
            adapter_config,
            export_format,
            artifact_name=artifact_name or target_dir.name,
            base_model=base_model,
            artifact_path=serve_path,
            files={f.path for f in files},
        )
        from finetune_server.training.engine.checkpoint import publish_dir

        publish_dir(staging, target_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = ArtifactManifest(
        format=export_format.value,
        step=step,
        base_model=base_model,
        files=files,
        total_size_bytes=sum(f.size_bytes for f in files),
        vllm=vllm,
    )
    on_progress("checksumming", 1.0, f"{len(files)} files, {manifest.total_size_bytes} bytes")
    bound.info("artifact exported", step=step, files=len(files), size_bytes=manifest.total_size_bytes)
    return manifest


@dataclass(frozen=True)
class _Source:
    """Where an export reads from: the job, the adapter chosen, and how to find the base model."""

    job_dir: Path
    config: Mapping[str, Any]
    adapter_dir: Path
    model_ref: str
    hub_cache_dir: Path | None
    hub_offline: bool | None

    def base_dir(self) -> Path:
        """The base model folder, downloaded when it is not here (and the hub is allowed)."""
        return resolve_model_dir(self.model_ref, cache_dir=self.hub_cache_dir, offline=self.hub_offline)


def _write_artifact(
    staging: Path,
    fmt: ExportFormat,
    source: _Source,
    on_progress: OnProgress,
    *,
    device: str | None,
    max_shard_size: str | int,
) -> None:
    """The artifact's files in `staging`: the weights (adapter or merged), tokenizer files, template and generation
    config."""
    tokenizer_dir, template = tokenizer_source(source.job_dir, source.config, source.base_dir)
    if fmt is ExportFormat.MERGED:
        base_dir = source.base_dir()
        _merge(base_dir, source.adapter_dir, staging, on_progress, device=device, max_shard_size=max_shard_size)
        generation_base = read_json_object(staging / layout.GENERATION_CONFIG_FILE)
    else:
        on_progress("saving", 0.0, "copying the adapter")
        for name in layout.ADAPTER_FILES:
            shutil.copy2(source.adapter_dir / name, staging / name)
        local_base = _local_base_dir(source.model_ref, source.hub_cache_dir)
        generation_base = read_json_object(local_base / layout.GENERATION_CONFIG_FILE) if local_base else {}
    save_tokenizer_files(tokenizer_dir, staging, template)
    _write_generation_config(staging, generation_base, tokenizer_dir, template)
    on_progress("saving", 0.8, "artifact written")


# --- the source adapter ----------------------------------------------------------------------------------------------


def find_adapter(job_dir: Path, checkpoint_step: int | None) -> tuple[Path, int]:
    """The adapter folder to export and its optimizer step: the final adapter, or the checkpoint of that step."""
    if checkpoint_step is None:
        adapter = layout.JobDir(job_dir).adapter
        if not layout.has_adapter(adapter):
            raise FinetuneError(
                ErrorKind.NOT_FOUND,
                "ADAPTER_NOT_FOUND",
                f"{job_dir.name} has no final adapter",
                hint="Export a checkpoint step instead, or train the job to completion.",
            )
        return adapter, _final_step(job_dir)
    from finetune_server.training.engine.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(job_dir)  # integer steps, oldest first
    for step, path in checkpoints:
        if step == checkpoint_step and layout.has_adapter(path / layout.ADAPTER_DIR):
            return path / layout.ADAPTER_DIR, step
    available = [step for step, _ in checkpoints]
    listed = ", ".join(map(str, available)) or "none"
    raise FinetuneError(
        ErrorKind.NOT_FOUND,
        "CHECKPOINT_NOT_FOUND",
        f"no checkpoint at step {checkpoint_step}; available steps: {listed}",
        metadata={"checkpoint_step": str(checkpoint_step), "available_steps": ",".join(map(str, available))},
        hint="Pick one of the available steps, or leave checkpoint_step unset for the final adapter.",
    )


def _final_step(job_dir: Path) -> int:
    """The final adapter's step: the training report's, else the newest checkpoint's."""
    steps = read_json_object(layout.JobDir(job_dir).metrics).get("steps")
    if isinstance(steps, int | float) and not isinstance(steps, bool):
        return int(steps)
    from finetune_server.training.engine.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(job_dir)
    return checkpoints[-1][0] if checkpoints else 0


def tokenizer_source(job_dir: Path, config: Mapping[str, Any], base_dir: Callable[[], Path]) -> tuple[Path, str]:
    """Where the tokenizer files come from and the chat template trained with.

    The final adapter folder holds both (written by training). Without it (a checkpoint of an unfinished job) the
    template is chosen again from the base model and the config, the same deterministic choice training made.
    """
    adapter = layout.JobDir(job_dir).adapter
    if (adapter / CHAT_TEMPLATE_FILE).is_file() and (adapter / "tokenizer.json").is_file():
        return adapter, (adapter / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    model_dir = base_dir()
    allow_fallback = config.get("allow_fallback_chat_template")
    try:
        template, _ = choose_chat_template(
            model_dir, str(config.get("chat_template") or ""), True if allow_fallback is None else bool(allow_fallback)
        )
    except TemplateError as exc:
        raise FinetuneError(ErrorKind.FAILED_PRECONDITION, "NO_CHAT_TEMPLATE", str(exc)) from exc
    return model_dir, template


def _local_base_dir(model_ref: str, hub_cache_dir: Path | None) -> Path | None:
    """The base model folder if it is on this machine (local path or hub cache), never downloading it."""
    try:
        return resolve_model_dir(model_ref, cache_dir=hub_cache_dir, offline=True)
    except FinetuneError:
        return None


# --- tokenizer, template and generation config ------------------------------------------------------------------------


def end_of_turn_id(tokenizer_dir: Path, template: str) -> int | None:
    """The special token the template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`...), if any.

    Found by rendering a two-turn conversation and taking the first special token after the answer's text.
    """
    from tokenizers import Tokenizer

    from finetune_server.training.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(tokenizer_dir)
        raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    except Exception:  # a FinetuneError, or the Rust side's plain Exception for a malformed file
        return None
    specials = {token_id for token_id, token in raw.get_added_tokens_decoder().items() if token.special}
    answer = "Paris is the capital of France."
    messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": answer}]
    variables: dict[str, Any] = dict(tokenizer.template_variables)
    try:
        text = render(template, messages, **variables)
    except TemplateError:
        return None
    at = text.rfind(answer)
    if at < 0:
        return None
    return next((i for i in tokenizer.encode(text[at + len(answer) :]) if i in specials), None)


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def generation_settings(base: Mapping[str, Any], tokenizer_dir: Path, template: str) -> dict[str, Any]:
    """`base` (a generation_config.json as a dict) with eos = tokenizer eos + end-of-turn + base eos, pad set."""
    from finetune_server.training.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    eos: list[int] = []
    for token_id in [tokenizer.eos_token_id, end_of_turn_id(tokenizer_dir, template), *_ids(base.get("eos_token_id"))]:
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    out = dict(base)
    if eos:
        out["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    pad = _ids(base.get("pad_token_id")) or _ids(tokenizer.pad_token_id) or eos[:1]
    if pad:
        out["pad_token_id"] = pad[0]
    if tokenizer.bos_token_id is not None and "bos_token_id" not in out:
        out["bos_token_id"] = tokenizer.bos_token_id
    return out


def stop_ids(model_dir: Path, tokenizer_dir: Path, template: str) -> tuple[list[int], int | None]:
    """The ids that end an answer and the pad id, as an export's generation_config.json holds them (the base's own
    from `model_dir`, the tokenizer's eos, the template's end of turn): what Generate and behaviour evaluation stop
    at, so they stop where a served export does."""
    settings = generation_settings(read_json_object(model_dir / layout.GENERATION_CONFIG_FILE), tokenizer_dir, template)
    eos, pad = settings.get("eos_token_id"), settings.get("pad_token_id")
    return ([eos] if isinstance(eos, int) else list(eos or [])), (pad if isinstance(pad, int) else None)


def _write_generation_config(dest: Path, base: Mapping[str, Any], tokenizer_dir: Path, template: str) -> None:
    settings = generation_settings(base, tokenizer_dir, template)
    (dest / layout.GENERATION_CONFIG_FILE).write_text(
        json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


# --- merging ---------------------------------------------------------------------------------------------------------


_FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def merge_dtype(base_config: Mapping[str, Any]) -> str:
    """The dtype the merged model is built and saved in: the base's own, as its config.json says (`dtype`, or
    `torch_dtype` before transformers 5); "auto" (transformers reads it off the weights) when it says none."""
    for key in ("dtype", "torch_dtype"):
        value = str(base_config.get(key) or "").removeprefix("torch.")
        if value in _FLOAT_DTYPES:
            return value
    return "auto"


def _merge(
    model_dir: Path,
    adapter_dir: Path,
    dest: Path,
    on_progress: OnProgress,
    *,
    device: str | None,
    max_shard_size: str | int,
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_config = read_json_object(model_dir / "config.json")
    if base_config.get("quantization_config"):
        raise FinetuneError(
            ErrorKind.FAILED_PRECONDITION,
            "BASE_QUANTIZED",
            f"{model_dir.name} is a quantised checkpoint: merging into rounded weights degrades the model",
            hint="Train on the full-precision base (load_in_4bit quantises it while loading), or export the ADAPTER.",
        )
    dev = torch.device(device or "cpu")
    dtype_name = merge_dtype(base_config)
    on_progress("loading_base", 0.0, f"loading the base model in {dtype_name} on {dev}")
    # No quantization_config: always the full-precision weights, whatever the training used.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype_name, "auto"))
    base = base.to(dev)
    on_progress("merging", 0.35, "applying the adapter")
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    merged = model.merge_and_unload(safe_merge=True)
    _keep_ties_honest(merged)
    on_progress("saving", 0.5, "writing safetensors shards")
    merged.save_pretrained(dest, max_shard_size=max_shard_size)
    del merged, model, base
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _keep_ties_honest(model: Any) -> None:
    """Declare embeddings untied when the merge made them differ (e.g. modules_to_save=["lm_head"] on a tied model).

    Otherwise save_pretrained drops lm_head as a duplicate and loading re-ties it to the old embeddings.
    """
    import torch

    config = model.config
    if not getattr(config, "tie_word_embeddings", False):
        return
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or inputs.weight is outputs.weight:
        return
    if inputs.weight.shape != outputs.weight.shape or not torch.equal(inputs.weight, outputs.weight):
        log.info("merged embeddings differ from lm_head: saving them untied")
        config.tie_word_embeddings = False


# --- checksums -------------------------------------------------------------------------------------------------------


def _iter_files(root: Path) -> Iterable[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def checksum_files(
    root: Path, on_progress: OnProgress | None = None, *, start: float = 0.0, end: float = 1.0
) -> list[ArtifactFile]:
    """Every file under `root` (sorted by relative path) with its size and sha256; progress by bytes read."""
    paths = list(_iter_files(root))
    total = max(1, sum(p.stat().st_size for p in paths))
    done = 0
    files = []
    for path in paths:
        digest = sha256_file(path)
        size = path.stat().st_size
        done += size
        relative = path.relative_to(root).as_posix()
        files.append(ArtifactFile(relative, size, digest))
        if on_progress is not None:
            on_progress("checksumming", start + (end - start) * done / total, relative)
    return files
