"""LoRATrainer: the fine-tuning service in-process, for library users and notebooks (no server, no gRPC).

It implements the same `IFineTuneService` as the remote client, so a Studio-like consumer can hold either. Nothing
here has rules of its own; every step is the service's own part, so the two cannot drift:
- a config dict is read by the client's conversion (the contract's field paths in violations) and the server's
  proto->domain conversion, then checked by `training.validation.validate`, exactly as ValidateConfig and Train do;
- reports, progress and exports reach the caller through the same messages and client conversions as over gRPC;
- training is `run_training` in this process and thread; exports are `export_artifact` (ADAPTER or MERGED).
Each job gets its folder from `storage.layout` (`work_dir/jobs/<job_id>`); calling `train` again with the same
`job_id` resumes it from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client.convert import (
    ConfigConversionError,
    config_from_dict,
    export_result_from_artifact,
    progress_from_proto,
    validation_result_from_report,
)
from finetune_client.interface import (
    ExportResult,
    IFineTuneService,
    ProbeComparison,
    ProgressCallback,
    ProgressUpdate,
    TrainResult,
    ValidationResult,
)
from finetune_server.api.convert import config_from_proto, fill, report_to_proto
from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.export.formats import FORMATS
from finetune_server.export.package import export_artifact, find_adapter
from finetune_server.jobs.service import job_not_found
from finetune_server.settings import ServerSettings
from finetune_server.storage.layout import JobDir
from finetune_server.training.config import TrainingConfig
from finetune_server.training.dataset_source import training_refs
from finetune_server.training.engine.errors import TrainingCancelled
from finetune_server.training.model_source import resolve_model
from finetune_server.training.validation import validate
from finetune_server.workers.train import event_message

if TYPE_CHECKING:  # the engine's modules import torch, which only training itself needs
    from finetune_server.training.engine.events import Event, EventSink

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
        """The report GrpcFineTuneService gives for the same dict: a dict that cannot be converted is reported
        without validating, like the client does before calling."""
        try:
            domain = _domain_config(config)
        except ConfigConversionError as exc:
            return ValidationResult(valid=False, errors=list(exc.problems), violations=list(exc.violations))
        return validation_result_from_report(report_to_proto(validate(domain, self.settings)))

    def train(
        self,
        config: Mapping[str, Any],
        progress_callback: ProgressCallback | None = None,
        *,
        job_id: str | None = None,
    ) -> TrainResult:
        """Validate, then train until the job ends. A dict that cannot be converted raises ConfigConversionError
        (as GrpcFineTuneService does) and an invalid config FinetuneError; neither creates anything. A job that fails
        or is cancelled returns `success=False` with the reason."""
        from finetune_server.training.data.token_cache import TokenCache
        from finetune_server.training.engine.recipe import run_training  # torch: only when training

        report = validate(_domain_config(config), self.settings)
        if not report.valid:
            raise report.rejection()
        job_id = job_id or uuid.uuid4().hex[:12]
        job = self.settings.layout.job(job_id)
        resolved = _record_resolved_config(job, report.resolved_config)
        model_ref, dataset, eval_dataset = self._training_inputs(resolved)
        self.last_job_id = job_id
        self._stop.clear()
        job_log = log.bind(job_id=job_id)
        on_event = _event_sink(job_id, progress_callback, job_log)
        try:
            outcome = run_training(
                resolved,
                model_ref=model_ref,
                dataset_path=dataset,
                eval_dataset_path=eval_dataset,
                output_dir=job.root,
                on_event=on_event,
                should_stop=self._stop.is_set,
                device=self.device,
                job_id=job_id,
                hub_cache_dir=self.settings.hf_cache_dir,
                hub_offline=self.settings.offline,
                token_cache=TokenCache(self.settings.token_cache_dir, self.settings.token_cache_max_bytes),
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
            probes=[ProbeComparison(**dataclasses.asdict(p)) for p in outcome.probes],
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
        """The server's export (`export_artifact`: the same files, sha256s and vLLM report), built next to
        `output_path` and renamed into place, so the folder there is the old one or the whole new one."""
        fmt = format.lower()
        if fmt not in FORMATS:
            raise FinetuneError(
                ErrorKind.INVALID_ARGUMENT, "INVALID_FORMAT", f"format must be 'adapter' or 'merged', not {format!r}"
            )
        job_id = job_id or self.last_job_id
        if job_id is None:
            raise FinetuneError(ErrorKind.FAILED_PRECONDITION, "NO_JOB", "no job has been trained yet: pass job_id")
        job = self.settings.layout.job(job_id)
        if not job.resolved_config.is_file():
            raise job_not_found(job_id)
        config = json.loads(job.resolved_config.read_text(encoding="utf-8"))
        find_adapter(job.root, None)  # ADAPTER_NOT_FOUND before looking for the base model
        target = Path(output_path).expanduser().absolute()
        _check_target(target, overwrite)
        model_name = TrainingConfig.from_dict(config).model_name
        export_log = log.bind(job_id=job_id, format=fmt)
        manifest = export_artifact(
            job_dir=job.root,
            config=config,
            model_ref=resolve_model(model_name, self.settings).load_ref,
            fmt=fmt,
            checkpoint_step=None,
            target_dir=target,
            on_progress=lambda stage, fraction, message: export_log.debug(
                "export progress", stage=stage, fraction=fraction, message=message
            ),
            hub_cache_dir=self.settings.hf_cache_dir,
            hub_offline=self.settings.offline,
            device=self.device,
            serve_path=str(target),  # vLLM serves it from where it is on this machine
            base_model=model_name,
        )
        return export_result_from_artifact(fill(pb.Artifact(), manifest.to_dict()), str(target))

    # --- helpers ---------------------------------------------------------------------------------------------------

    def _training_inputs(self, config: TrainingConfig) -> tuple[str, str, str | None]:
        """The model to load and the datasets' refs, found the way the job service finds them for a worker."""
        return training_refs(config, self.settings)


def _domain_config(config: Mapping[str, Any]) -> TrainingConfig:
    """The dict as the server receives it: the client's conversion (ConfigConversionError listing every unknown key
    and wrong type by its field path), then the server's reading of the message."""
    return config_from_proto(config_from_dict(config))


def _record_resolved_config(job: JobDir, resolved: TrainingConfig) -> TrainingConfig:
    """Write the job's resolved config (its exports read it) and return it as a worker reads its spec."""
    job.root.mkdir(parents=True, exist_ok=True)
    values = resolved.to_dict()
    job.resolved_config.write_text(json.dumps(values, indent=2), encoding="utf-8")
    return TrainingConfig.from_dict(values)


def _event_sink(job_id: str, progress_callback: ProgressCallback | None, job_log: Any) -> EventSink:
    """Engine events as the remote path turns them into ProgressUpdates: the worker's event message, filled into
    the contract's TrainingProgress as the server does, read by the client's conversion."""

    def on_event(event: Event) -> None:
        message = event_message(event)
        data = message.data
        if message.kind == "progress" and progress_callback is not None:
            progress_callback(_progress_update(data, job_id))
        elif message.kind == "log":
            job_log.info("training log", level=data["level"], message=data["message"])

    return on_event


def _progress_update(data: Mapping[str, Any], job_id: str) -> ProgressUpdate:
    return progress_from_proto(fill(pb.TrainingProgress(), data), job_id)


def _check_target(target: Path, overwrite: bool) -> None:
    """Like the remote client: a missing path or an empty folder is written; anything else only with `overwrite`."""
    if overwrite or not (target.exists() or target.is_symlink()):
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    raise FinetuneError(ErrorKind.ALREADY_EXISTS, "OUTPUT_EXISTS", f"{target} exists", hint="pass overwrite=True")
