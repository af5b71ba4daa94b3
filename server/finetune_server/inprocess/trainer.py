"""LoRATrainer: the fine-tuning service in-process, for library users and notebooks (no server, no gRPC).

It implements the same `IFineTuneService` as the remote client, so a Studio-like consumer can hold either. `train`
validates the config exactly as the server does (training/validation.py), runs the training loop in this process and
thread, and turns the loop's progress events into the client's ProgressUpdate. Each job gets a folder under
`work_dir/jobs/<job_id>`; calling `train` again with the same `job_id` resumes it from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import shutil
import threading
import uuid
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import structlog

from finetune_client.interface import (
    ExportResult,
    FieldViolation,
    IFineTuneService,
    ProgressCallback,
    ProgressUpdate,
    TrainResult,
    ValidationResult,
)
from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.settings import ServerSettings
from finetune_server.storage import layout
from finetune_server.training.config import TrainingConfig
from finetune_server.training.engine.errors import TrainingCancelled
from finetune_server.training.engine.events import Event, LogEvent, ProgressEvent

log = structlog.get_logger(__name__)


class LoRATrainer(IFineTuneService):
    """Train LoRA adapters in this process. Local model folders and datasets anywhere on this machine are allowed
    (it is the caller's own machine), unless `settings` says otherwise."""

    def __init__(
        self,
        work_dir: str | PathLike[str],
        *,
        settings: ServerSettings | None = None,
        device: str | None = None,
    ) -> None:
        self.work_dir = Path(work_dir).expanduser().resolve()
        self.settings = settings or ServerSettings(
            data_dir=self.work_dir, model_roots=[Path("/")], dataset_roots=[Path("/")]
        )
        self.device = device
        self.last_job_id: str | None = None
        self._stop = threading.Event()

    # --- IFineTuneService ------------------------------------------------------------------------------------------

    def validate_config(self, config: Mapping[str, Any]) -> ValidationResult:
        from finetune_server.training.validation import validate

        report = validate(_parse_config(config), self.settings)
        return ValidationResult(
            valid=report.valid,
            errors=[_violation_text(v.field, v.message, v.line) for v in report.violations],
            warnings=[_violation_text(w.field, w.message) for w in report.warnings],
            violations=[FieldViolation(v.field, v.reason, v.message, v.line) for v in report.violations],
            resolved_config=report.resolved_config.to_dict(),
            preset_filled_fields=list(report.preset_filled_fields),
            memory_estimate=_plain(report.memory_estimate),
            dataset=_plain(report.dataset),
            model=_plain(report.model),
            eval_dataset=_plain(report.eval_dataset),
        )

    def train(
        self,
        config: Mapping[str, Any],
        progress_callback: ProgressCallback | None = None,
        *,
        job_id: str | None = None,
    ) -> TrainResult:
        """Validate, then train until the job ends. An invalid config raises FinetuneError (nothing is created);
        a job that fails or is cancelled returns `success=False` with the reason."""
        from finetune_server.training.engine.recipe import run_training
        from finetune_server.training.validation import resolve_dataset_path, validate

        report = validate(_parse_config(config), self.settings)
        if not report.valid:
            raise report.rejection()
        resolved = report.resolved_config
        dataset = resolve_dataset_path(resolved.dataset, self.settings, "dataset")
        eval_dataset = (
            resolve_dataset_path(resolved.eval_dataset, self.settings, "eval_dataset")
            if resolved.eval_dataset.strip()
            else None
        )
        job_id = job_id or uuid.uuid4().hex[:12]
        output_dir = self.settings.jobs_dir / job_id
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / layout.RESOLVED_CONFIG_FILE).write_text(
            json.dumps(resolved.to_dict(), indent=2), encoding="utf-8"
        )
        self.last_job_id = job_id
        self._stop.clear()
        job_log = log.bind(job_id=job_id)

        def on_event(event: Event) -> None:
            if isinstance(event, ProgressEvent) and progress_callback is not None:
                progress_callback(_progress_update(event, job_id))
            elif isinstance(event, LogEvent):
                job_log.info("training log", level=event.level.value, message=event.message)

        try:
            outcome = run_training(
                resolved,
                model_ref=_model_ref(resolved, self.settings),
                dataset_path=dataset,
                eval_dataset_path=eval_dataset,
                output_dir=output_dir,
                on_event=on_event,
                should_stop=self._stop.is_set,
                device=self.device,
                job_id=job_id,
                hub_cache_dir=self.settings.hf_cache_dir,
                hub_offline=self.settings.offline,
            )
        except TrainingCancelled as stop:
            return TrainResult(success=False, job_id=job_id, state="cancelled", steps=stop.step, error=str(stop))
        except FinetuneError as exc:
            job_log.warning("training failed", reason=exc.reason, message=exc.message)
            text = f"{exc.reason}: {exc.message}" + (f" ({exc.hint})" if exc.hint else "")
            return TrainResult(
                success=False, job_id=job_id, state="failed", steps=int(getattr(exc, "step", 0)), error=text
            )
        return TrainResult(
            success=True,
            job_id=job_id,
            state="succeeded",
            final_loss=outcome.final_train_loss,
            eval_loss=outcome.final_eval_loss,
            steps=outcome.steps,
            metrics=dict(outcome.metrics),
            adapter_location=str(outcome.adapter_dir),
        )

    def cancel(self) -> None:
        """Ask the running `train` call (from another thread) to stop between micro-steps."""
        self._stop.set()

    def export_model(
        self,
        output_path: str | PathLike[str],
        *,
        format: str = "adapter",  # noqa: A002 - the interface's keyword
        job_id: str | None = None,
        overwrite: bool = False,
    ) -> ExportResult:
        if format == "merged":
            raise NotImplementedError(
                "merged export is not available in LoRATrainer yet: export format='adapter' and merge with "
                "peft's merge_and_unload onto a 16-bit copy of the base model"
            )
        if format != "adapter":
            raise FinetuneError(
                ErrorKind.INVALID_ARGUMENT, "INVALID_FORMAT", f"format must be 'adapter' or 'merged', not {format!r}"
            )
        job_id = job_id or self.last_job_id
        if job_id is None:
            raise FinetuneError(ErrorKind.FAILED_PRECONDITION, "NO_JOB", "no job has been trained yet: pass job_id")
        adapter = self.settings.layout.job(job_id).adapter
        if not layout.has_adapter(adapter):
            raise FinetuneError(ErrorKind.NOT_FOUND, "ADAPTER_NOT_FOUND", f"job {job_id} has no trained adapter")
        target = Path(output_path).expanduser()
        if target.exists():
            if not overwrite:
                raise FinetuneError(
                    ErrorKind.ALREADY_EXISTS, "OUTPUT_EXISTS", f"{target} exists", hint="pass overwrite=True"
                )
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(adapter, target)
        files: list[dict[str, Any]] = [
            {"path": str(f.relative_to(target)), "size_bytes": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(target.rglob("*"))
            if f.is_file()
        ]
        return ExportResult(
            success=True,
            output_path=str(target),
            format="adapter",
            files=files,
            total_size_bytes=sum(int(f["size_bytes"]) for f in files),
            vllm=_vllm_compatibility(target),
        )


# --- helpers ---------------------------------------------------------------------------------------------------------


def _parse_config(config: Mapping[str, Any]) -> TrainingConfig:
    values = dict(config)
    lora = values.get("lora") or {}
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    lora_known = {"r", "alpha", "dropout", "target_modules", "modules_to_save", "use_dora"}
    unknown = sorted(set(values) - known) + sorted(f"lora.{k}" for k in set(dict(lora)) - lora_known)
    if unknown:
        raise FinetuneError(
            ErrorKind.INVALID_ARGUMENT, "UNKNOWN_FIELD", f"unknown config field(s): {', '.join(unknown)}"
        )
    values["lora"] = dict(lora)
    for key in ("target_modules", "modules_to_save"):
        if values["lora"].get(key) is None:
            values["lora"].pop(key, None)
    return TrainingConfig.from_dict(values)


def _model_ref(config: TrainingConfig, settings: ServerSettings) -> str:
    """A local folder (found the way validation found it) or the hub id as given."""
    from finetune_server.training.model_source import resolve_model

    resolved = resolve_model(config.model_name, settings)
    return str(resolved.path) if resolved.source == "local" else resolved.name  # the loop downloads hub weights


def _progress_update(event: ProgressEvent, job_id: str) -> ProgressUpdate:
    return ProgressUpdate(
        step=event.step,
        total_steps=event.total_steps,
        epoch=event.epoch,
        loss=event.loss,
        learning_rate=event.learning_rate,
        grad_norm=event.grad_norm,
        tokens_per_second=event.tokens_per_second,
        elapsed_s=event.elapsed_s,
        eta_s=event.eta_s,
        memory_bytes=event.memory.allocated_bytes,
        job_id=job_id,
    )


def _violation_text(field: str, message: str, line: int = 0) -> str:
    where = f"line {line}: " if line else ""
    return f"{field}: {where}{message}" if field else f"{where}{message}"


def _plain(value: Any) -> Any:
    """A dataclass tree as JSON-friendly dicts (paths and enums as strings); None stays None."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _vllm_compatibility(adapter: Path) -> dict[str, Any]:
    """vLLM rejects adapters with modules_to_save or DoRA (DESIGN.md); say so before someone tries to serve it."""
    config = json.loads((adapter / layout.ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    problems = []
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set: vLLM cannot load such adapters")
    if config.get("use_dora"):
        problems.append("DoRA adapters are not supported by vLLM")
    base = config.get("base_model_name_or_path") or "<base model>"
    return {
        "compatible": not problems,
        "problems": problems,
        "serve_command": f"vllm serve {base} --enable-lora --lora-modules {adapter.name}={adapter}",
    }
