"""The export worker: runs `export_artifact` in a subprocess and reports over a pipe (`protocol.py`).

Exports import torch, load whole models and may run out of memory; in a subprocess a failure never takes the server
down and its exit frees the device memory. Started as ``python -m finetune_server.workers.export --spec SPEC.json
--events-fd N``; SPEC.json is `ExportSpec`. The server half is `supervisor.run_export`. This module never imports
torch at module level (the server imports it, for `ExportSpec`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import structlog

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.export.formats import FORMATS
from finetune_server.host.cpu_policy import apply_in_worker
from finetune_server.workers.protocol import (
    EXIT_CRASH,
    EXIT_ERROR,
    EXIT_OK,
    Artifact,
    Channel,
    Error,
    ExportProgress,
    Spec,
    exit_process,
    parse_worker_args,
)

log = structlog.get_logger(__name__)

WORKER_MODULE = "finetune_server.workers.export"  # what the server starts with `python -m`


@dataclass(frozen=True)
class ExportSpec(Spec):
    """Everything the worker needs; JSON-able. Unknown keys are ignored, missing required ones are an error."""

    job_dir: str
    config: dict[str, Any]  # the resolved TrainingConfig as a dict
    model_ref: str
    fmt: str  # "adapter" | "merged"
    target_dir: str
    checkpoint_step: int | None = None  # None: the final adapter
    hub_cache_dir: str | None = None
    hub_offline: bool | None = None
    device: str | None = None  # where the merge runs; None: the CPU (a GPU only when named, e.g. "cuda:0")
    artifact_name: str | None = None
    serve_path: str | None = None
    base_model: str | None = None  # the base's name as people know it (a hub id), for the manifest and vllm serve
    cpu_threads: int | None = None  # torch/OpenMP threads; None: torch's default
    cpus: list[int] | None = None  # CPUs to run on; None: the server's

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The spec, or FinetuneError(INVALID_ARGUMENT) for a missing field or an unknown format."""
        try:
            spec = super().from_dict(data)
        except TypeError as exc:
            raise FinetuneError(ErrorKind.INVALID_ARGUMENT, "EXPORT_SPEC_INVALID", f"bad export spec: {exc}") from exc
        if spec.fmt not in FORMATS:
            raise FinetuneError(
                ErrorKind.INVALID_ARGUMENT, "EXPORT_FORMAT", f"format must be one of {', '.join(FORMATS)}"
            )
        return spec


def run(spec: ExportSpec, channel: Channel) -> int:
    """Export and send the final message; returns the exit code (typed errors included)."""
    from finetune_server.export.package import export_artifact

    def progress(stage: str, fraction: float, message: str) -> None:
        channel.send(ExportProgress(stage=stage, fraction=fraction, message=message))

    try:
        manifest = export_artifact(
            job_dir=Path(spec.job_dir),
            config=spec.config,
            model_ref=spec.model_ref,
            fmt=spec.fmt,
            checkpoint_step=spec.checkpoint_step,
            target_dir=Path(spec.target_dir),
            on_progress=progress,
            hub_cache_dir=Path(spec.hub_cache_dir) if spec.hub_cache_dir else None,
            hub_offline=spec.hub_offline,
            device=spec.device,
            artifact_name=spec.artifact_name,
            serve_path=spec.serve_path,
            base_model=spec.base_model,
        )
    except FinetuneError as exc:
        log.warning("export failed", reason=exc.reason, error=exc.message)
        channel.send(Error.from_exception(exc))
        return EXIT_ERROR
    channel.send(Artifact(data=manifest.to_dict()))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_worker_args(WORKER_MODULE, "Export one artifact.", argv)
    channel = Channel.open(args.events_fd, threading.Event())  # no stdin to watch: the server kills an export
    try:
        spec = ExportSpec.read(args.spec)
        apply_in_worker(spec.cpu_threads, spec.cpus)  # before run() imports torch
        code = run(spec, channel)
    except FinetuneError as exc:  # a bad spec
        channel.send(Error.from_exception(exc))
        code = EXIT_ERROR
    except Exception:
        log.exception("export worker crashed")
        code = EXIT_CRASH
    channel.close()
    return code


if __name__ == "__main__":
    exit_process(main())
