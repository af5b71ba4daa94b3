"""Exports and downloads: turn a SUCCEEDED job's adapter into an artifact once, and stream its files with checksums.

The packaging itself (it needs torch) runs in a subprocess (`workers/export.py`); this side orchestrates, records the
artifact only once its folder is complete, and never lets a caller name a server-side path. An export outlives the
call that began it, by design: a dropped stream still gets its artifact recorded, and another Export of the same job,
format and checkpoint while it runs follows it (its progress from then on, the same artifact) instead of starting a
second worker on the same folder.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.export.formats import ExportFormat
from finetune_server.host.diskspace import ensure_free_space, export_disk_bytes
from finetune_server.jobs import idempotency
from finetune_server.jobs.service import job_not_found
from finetune_server.settings import ServerSettings
from finetune_server.storage import layout
from finetune_server.storage.job_store import JobStore
from finetune_server.storage.records import ArtifactRecord, JobState
from finetune_server.training.config import TrainingConfig
from finetune_server.training.model_info import summarize_model
from finetune_server.training.model_source import ResolvedModel, resolve_model
from finetune_server.util.aio import get_unless_done
from finetune_server.workers.protocol import ExportProgress
from finetune_server.workers.supervisor import run_export
from finetune_server.workers.warm_pool import FreshLauncher, WorkerLauncher

log = structlog.get_logger(__name__)

CHUNK_BYTES = 1 << 20


def unknown_artifact(art_id: str) -> FinetuneError:
    return FinetuneError(ErrorKind.NOT_FOUND, "ARTIFACT_NOT_FOUND", f"no artifact has the id {art_id!r}")


def artifact_id(job_id: str, fmt: ExportFormat, checkpoint_step: int | None) -> str:
    key = f"{job_id}:{fmt.name}:{'final' if checkpoint_step is None else checkpoint_step}"
    return "art-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class _RunningExport:
    """One export in progress and the callers following it; each follower hears the progress from when it came."""

    def __init__(self, task: asyncio.Task[ArtifactRecord]) -> None:
        self.task = task
        self._followers: list[asyncio.Queue[ExportProgress]] = []

    def publish(self, progress: ExportProgress) -> None:
        for queue in self._followers:
            queue.put_nowait(progress)

    async def follow(self) -> AsyncIterator[ExportProgress | ArtifactRecord]:
        """Progress until the export ends, then its artifact (or its error). Leaving early leaves the export be."""
        queue: asyncio.Queue[ExportProgress] = asyncio.Queue()
        self._followers.append(queue)
        try:
            while not self.task.done() or not queue.empty():
                progress = await get_unless_done(queue, self.task)
                if progress is not None:
                    yield progress
            yield await asyncio.shield(self.task)  # raises the export's FinetuneError
        finally:
            self._followers.remove(queue)


class ExportService:
    def __init__(self, settings: ServerSettings, store: JobStore, launcher: WorkerLauncher | None = None) -> None:
        self._settings = settings
        self._store = store
        self._launcher = launcher or FreshLauncher()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._running: dict[str, _RunningExport] = {}  # by artifact id; an export outlives the call that began it

    async def _stored(self, art_id: str) -> ArtifactRecord | None:
        try:
            record = await asyncio.to_thread(self._store.get_artifact, art_id)
        except KeyError:
            return None
        folder = self._settings.data_dir / record.path
        complete = all((folder / f["path"]).is_file() for f in record.files)
        return record if complete else None

    async def export(
        self,
        job_id: str,
        fmt: ExportFormat,
        checkpoint_step: int | None,
        *,
        owner: str = "",
        request_id: str = "",
    ) -> AsyncIterator[ExportProgress | ArtifactRecord]:
        """Yield the worker's progress messages (stage, fraction, message), then the artifact record."""
        try:
            job = await asyncio.to_thread(self._store.get_job, job_id)
        except KeyError:
            raise job_not_found(job_id) from None
        if job.state is not JobState.SUCCEEDED:
            raise FinetuneError(
                ErrorKind.FAILED_PRECONDITION,
                "JOB_NOT_SUCCEEDED",
                f"job {job_id} is {job.state.value}; only a SUCCEEDED job can be exported",
            )
        art_id = artifact_id(job_id, fmt, checkpoint_step)
        await idempotency.claim(
            self._store,
            owner=owner,
            method="Export",
            request_id=request_id,
            request={"job_id": job_id, "format": fmt.name, "checkpoint_step": checkpoint_step},
            resource_field="artifact_id",
            resource_id=art_id,
        )
        async with self._locks[art_id]:  # one caller at a time decides between stored, running and a new run
            running = self._running.get(art_id)  # looked up before the store: a run records before it leaves
            if running is None:
                existing = await self._stored(art_id)
                if existing is not None:
                    yield existing
                    return
                running = await self._start(art_id, job_id, job.config, fmt, checkpoint_step)
        async for item in running.follow():
            yield item

    async def _start(
        self, art_id: str, job_id: str, job_config: dict[str, Any], fmt: ExportFormat, checkpoint_step: int | None
    ) -> _RunningExport:
        """Check what the export needs, then run it as a task of its own: it goes on (and records its artifact)
        whether or not anyone still follows it, so a dropped stream loses nothing and a retry attaches."""
        config = TrainingConfig.from_dict(job_config)
        model = await asyncio.to_thread(resolve_model, config.model_name, self._settings)
        await asyncio.to_thread(self._check_disk, job_id, model, fmt)
        spec = {
            "job_dir": str(self._settings.jobs_dir / job_id),
            "config": job_config,
            "model_ref": model.load_ref,
            "base_model": config.model_name,
            "fmt": fmt.value,
            "checkpoint_step": checkpoint_step,
            "target_dir": str(self._settings.artifacts_dir / art_id),
            "hub_cache_dir": str(self._settings.hf_cache_dir) if self._settings.hf_cache_dir else None,
            "hub_offline": self._settings.offline,
            "cpu_threads": self._settings.threads_per_worker,
            "cpus": self._settings.worker_cpus or None,
        }
        running = _RunningExport(asyncio.create_task(self._produce(running_id=art_id, job_id=job_id, spec=spec)))
        self._running[art_id] = running
        running.task.add_done_callback(functools.partial(self._finished, art_id))
        log.info("export.started", job_id=job_id, artifact_id=art_id, format=fmt.name)
        return running

    def _finished(self, art_id: str, task: asyncio.Task[ArtifactRecord]) -> None:
        self._running.pop(art_id, None)
        if not task.cancelled() and task.exception() is not None:  # retrieved here: followers may all be gone
            log.info("export.failed", artifact_id=art_id, error=str(task.exception()))

    async def _produce(self, *, running_id: str, job_id: str, spec: dict[str, Any]) -> ArtifactRecord:
        art_id, target = running_id, Path(spec["target_dir"])
        self._settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
        manifest = await run_export(
            spec,
            on_progress=functools.partial(self._publish, art_id),
            log_path=self._settings.layout.artifact_log(art_id),
            launcher=self._launcher,
        )
        record = ArtifactRecord(
            id=art_id,
            job_id=job_id,
            format=ExportFormat(spec["fmt"]).name,
            step=int(manifest["step"]),
            base_model=spec["base_model"],
            path=str(target.relative_to(self._settings.data_dir)),
            files=list(manifest["files"]),
            total_size_bytes=int(manifest["total_size_bytes"]),
            vllm=dict(manifest["vllm"]),
            create_time=time.time(),
        )
        await asyncio.to_thread(self._store.put_artifact, record)
        log.info("export.done", job_id=job_id, artifact_id=art_id, format=record.format, bytes=record.total_size_bytes)
        return record

    async def _publish(self, art_id: str, progress: ExportProgress) -> None:
        running = self._running.get(art_id)
        if running is not None:
            running.publish(progress)

    def _check_disk(self, job_id: str, model: ResolvedModel, fmt: ExportFormat) -> None:
        adapter = self._settings.layout.job(job_id).adapter / layout.ADAPTER_WEIGHTS_FILE
        adapter_bytes = adapter.stat().st_size if adapter.is_file() else 0
        merged = fmt is ExportFormat.MERGED
        base = summarize_model(model).num_parameters if merged else 0
        needed = export_disk_bytes(base, adapter_bytes // 4, merged)
        ensure_free_space(self._settings.artifacts_dir, needed, self._settings.disk_reserve_bytes, "this export")

    async def owner_of(self, art_id: str) -> str:
        """The owner of the job an artifact came from (NOT_FOUND for an unknown artifact)."""
        try:
            record = await asyncio.to_thread(self._store.get_artifact, art_id)
            return (await asyncio.to_thread(self._store.get_job, record.job_id)).owner
        except KeyError:
            raise unknown_artifact(art_id) from None

    async def download(self, art_id: str, path: str, offset: int) -> AsyncIterator[dict[str, Any]]:
        """Chunks of one file (from `offset`) or of every file; DATA_LOSS when a file no longer matches its sha256."""
        try:
            record = await asyncio.to_thread(self._store.get_artifact, art_id)
        except KeyError:
            raise unknown_artifact(art_id) from None
        files = {f["path"]: f for f in record.files}
        if path and path not in files:
            raise FinetuneError(ErrorKind.NOT_FOUND, "FILE_NOT_FOUND", f"artifact {art_id} has no file {path!r}")
        if offset and not path:
            raise FinetuneError(ErrorKind.INVALID_ARGUMENT, "OFFSET_NEEDS_PATH", "an offset needs a path")
        if offset < 0 or (path and offset > files[path]["size_bytes"]):
            raise FinetuneError(ErrorKind.OUT_OF_RANGE, "OFFSET_OUT_OF_RANGE", f"offset {offset} is outside {path!r}")
        root = (self._settings.data_dir / record.path).resolve()
        for entry in [files[path]] if path else record.files:
            async for chunk in self._file_chunks(root, entry, offset if path else 0):
                yield chunk

    async def _file_chunks(self, root: Path, entry: dict[str, Any], offset: int) -> AsyncIterator[dict[str, Any]]:
        file = (root / entry["path"]).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            raise FinetuneError(ErrorKind.DATA_LOSS, "FILE_MISSING", f"{entry['path']} is missing on the server")
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            if offset:  # the checksum covers the whole file, so read what the caller already has
                remaining = offset
                while remaining:
                    block = handle.read(min(CHUNK_BYTES, remaining))
                    if not block:
                        break
                    digest.update(block)
                    remaining -= len(block)
            position, sent = offset, False
            while True:
                data = await asyncio.to_thread(handle.read, CHUNK_BYTES)
                digest.update(data)
                if data or not sent:  # an empty file (or a resume at its end) still gets one chunk
                    yield {
                        "path": entry["path"],
                        "offset": position,
                        "data": data,
                        "file_size": entry["size_bytes"],
                        "sha256": entry["sha256"],
                    }
                    sent = True
                    position += len(data)
                if not data:
                    break
        if digest.hexdigest() != entry["sha256"]:
            raise FinetuneError(
                ErrorKind.DATA_LOSS,
                "CHECKSUM_MISMATCH",
                f"{entry['path']} on the server no longer matches its recorded sha256; discard what was received",
            )
