"""The export worker: runs `export_artifact` in a subprocess, and `run_export`, its server half.

Exports import torch, load whole models and may run out of memory; in a subprocess a failure never takes the server
down and its exit frees the device memory. This module never imports torch at module level (the server imports it).

Protocol (the style of `jobs/worker.py`)
---------------------------------------
Started as ``python -m finetune_server.workers.export --spec SPEC.json --events-fd N`` in its own process group.
SPEC.json is `ExportSpec` as JSON: job_dir, config (the resolved TrainingConfig as a dict), model_ref, fmt
("adapter" | "merged"), checkpoint_step (null: the final adapter), target_dir, hub_cache_dir, hub_offline, and
optionally device, artifact_name, serve_path, base_model (the name for people and `vllm serve`).

The worker writes one JSON object per line to fd N, flushed after each (never stdout: libraries print there):
- ``{"type": "progress", "stage", "fraction", "message"}``, stages `loading_base`, `merging`, `saving`,
  `checksumming`, fraction in [0, 1];
- then exactly one final message: ``{"type": "artifact", "data": ArtifactManifest.to_dict()}`` and exit 0, or
  ``{"type": "error", "reason", "message", "hint", "kind", "metadata"}`` and exit 1 for a typed error (FinetuneError;
  `kind` is its ErrorKind value). An unexpected exception is logged with its traceback and exits 2 with no final
  message: `run_export` reports it, like a death by signal, as EXPORT_CRASHED with the log's tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.export.formats import FORMATS
from finetune_server.export.package import remove_staging
from finetune_server.host.cpu_policy import apply_in_worker
from finetune_server.workers.supervisor import (
    kill_process_group,
    read_log_tail,
    read_messages,
    spawn_with_pipe,
    wait_for_exit,
)
from finetune_server.workers.train import Channel, parse_worker_args

log = structlog.get_logger(__name__)

WORKER_MODULE = "finetune_server.workers.export"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CRASH = 2
CRASH_TAIL_LINES = 20

OnProgress = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class ExportSpec:
    """Everything the worker needs; JSON-able. Unknown keys are ignored, missing required ones are an error."""

    job_dir: str
    config: dict[str, Any]
    model_ref: str
    fmt: str
    target_dir: str
    checkpoint_step: int | None = None
    hub_cache_dir: str | None = None
    hub_offline: bool | None = None
    device: str | None = None
    artifact_name: str | None = None
    serve_path: str | None = None
    base_model: str | None = None  # the base's name as people know it (a hub id), for the manifest and vllm serve
    cpu_threads: int | None = None  # torch/OpenMP threads; None: torch's default
    cpus: list[int] | None = None  # CPUs to run on; None: the server's

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExportSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            spec = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise FinetuneError(ErrorKind.INVALID_ARGUMENT, "EXPORT_SPEC_INVALID", f"bad export spec: {exc}") from exc
        if spec.fmt not in FORMATS:
            raise FinetuneError(
                ErrorKind.INVALID_ARGUMENT, "EXPORT_FORMAT", f"format must be one of {', '.join(FORMATS)}"
            )
        return spec


def error_message(exc: FinetuneError) -> dict[str, Any]:
    return {
        "type": "error",
        "reason": exc.reason,
        "message": exc.message,
        "hint": exc.hint,
        "kind": exc.kind.value,
        "metadata": exc.metadata,
    }


def run(spec: ExportSpec, channel: Channel) -> int:
    """Export and send the final message; returns the exit code (typed errors included)."""
    from finetune_server.export.package import export_artifact

    def progress(stage: str, fraction: float, message: str) -> None:
        channel.send({"type": "progress", "stage": stage, "fraction": fraction, "message": message})

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
        channel.send(error_message(exc))
        return EXIT_ERROR
    channel.send({"type": "artifact", "data": manifest.to_dict()})
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_worker_args(WORKER_MODULE, "Export one artifact.", argv)
    channel = Channel(os.fdopen(args.events_fd, "w", encoding="utf-8"), threading.Event())
    try:
        spec = ExportSpec.from_dict(json.loads(args.spec.read_text(encoding="utf-8")))
        apply_in_worker(spec.cpu_threads, spec.cpus)  # before run() imports torch
        code = run(spec, channel)
    except FinetuneError as exc:  # a bad spec
        channel.send(error_message(exc))
        code = EXIT_ERROR
    except Exception:
        log.exception("export worker crashed")
        code = EXIT_CRASH
    channel.close()
    return code


# --- the server half -------------------------------------------------------------------------------------------------


async def run_export(
    spec: Mapping[str, Any],
    *,
    on_progress: OnProgress,
    log_path: Path,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run one export in a worker subprocess; await `on_progress` for each progress message, in order.

    Returns the artifact manifest (`ArtifactManifest.to_dict()`). Raises the worker's FinetuneError for a typed
    failure, and FinetuneError(UNAVAILABLE, EXPORT_CRASHED) with the log's tail when it died without a final message.
    If this coroutine is cancelled, the worker's process group is killed and its staging folder removed.
    """
    checked = ExportSpec.from_dict(spec)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    target_dir = Path(checked.target_dir)
    bound = log.bind(target=target_dir.name, format=checked.fmt)
    fd, name = tempfile.mkstemp(dir=log_path.parent, prefix=".export-spec-", suffix=".json")
    spec_path = Path(name)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(checked.to_dict(), handle)
    try:
        returncode, final = await _run_worker(spec_path, log_path, env, on_progress, bound)
    except BaseException:
        remove_staging(target_dir)
        raise
    finally:
        spec_path.unlink(missing_ok=True)  # noqa: ASYNC240 - one small file
    if final is not None and final.get("type") == "artifact":
        return dict(final.get("data") or {})
    if final is not None:
        raise _error_from_message(final)
    remove_staging(target_dir)  # a killed worker cannot clean up after itself
    tail = read_log_tail(log_path, lines=CRASH_TAIL_LINES)
    how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
    bound.warning("export worker crashed", returncode=returncode)
    raise FinetuneError(
        ErrorKind.UNAVAILABLE,
        "EXPORT_CRASHED",
        f"the export worker ended with {how} before finishing; last log lines:\n" + "\n".join(tail),
        hint="Out of memory is the usual cause of a merge that dies: export the ADAPTER, or free memory and retry.",
        metadata={"returncode": str(returncode), "log": str(log_path)},
    )


async def _run_worker(
    spec_path: Path,
    log_path: Path,
    env: Mapping[str, str] | None,
    on_progress: OnProgress,
    bound: Any,
) -> tuple[int, dict[str, Any] | None]:
    child_env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    pipe = await spawn_with_pipe(
        WORKER_MODULE, spec_path, log_path=log_path, env=child_env, stdin=asyncio.subprocess.DEVNULL
    )
    bound.info("export worker spawned", pid=pipe.pid, log=str(log_path))
    final: list[dict[str, Any]] = []

    async def relay() -> None:
        async for message in read_messages(pipe.reader, bound):
            kind = message.get("type")
            if kind == "progress":
                await on_progress(message)
            elif kind in ("artifact", "error") and not final:
                final.append(message)

    relay_task = asyncio.create_task(relay())
    try:
        returncode = await wait_for_exit(pipe, relay_task, bound)
    except BaseException:
        relay_task.cancel()
        kill_process_group(pipe.pid)
        with contextlib.suppress(ProcessLookupError, asyncio.CancelledError):
            await asyncio.shield(pipe.process.wait())
        raise
    finally:
        pipe.transport.close()
    kill_process_group(pipe.pid)  # leftovers it started must not hold the GPU after it
    bound.info("export worker exited", pid=pipe.pid, returncode=returncode, final=final[0]["type"] if final else None)
    return returncode, final[0] if final else None


def _error_from_message(message: Mapping[str, Any]) -> FinetuneError:
    try:
        kind = ErrorKind(message.get("kind"))
    except ValueError:
        kind = ErrorKind.FAILED_PRECONDITION
    metadata = message.get("metadata")
    return FinetuneError(
        kind,
        str(message.get("reason") or "EXPORT_FAILED"),
        str(message.get("message") or "the export failed"),
        hint=str(message.get("hint") or ""),
        metadata={str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else None,
    )


if __name__ == "__main__":
    sys.exit(main())
