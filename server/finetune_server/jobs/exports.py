"""Exports and downloads: turn a SUCCEEDED job's adapter into an artifact once, and stream its files with checksums.

The packaging itself (it needs torch) runs in a subprocess (`workers/export.py`); this side orchestrates, records the
artifact only once its folder is complete, and never lets a caller name a server-side path. An export outlives the
call that began it, by design: a dropped stream still gets its artifact recorded, and another Export of the same job,
format and checkpoint while it runs follows it (its progress from then on, the same artifact) instead of starting a
second worker on the same folder.

Deleting an artifact (or a job with its artifacts) is refused while it is being exported or downloaded on this
server: its files would vanish under a reader that was promised them. While a deletion runs, no export or download of
what it deletes can start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
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
from finetune_server.storage.job_store import JobStore, StoreLock
from finetune_server.storage.records import ArtifactRecord, JobRecord, JobState
from finetune_server.training.config import TrainingConfig
from finetune_server.training.model_info import summarize_model
from finetune_server.training.model_source import ResolvedModel, resolve_model
from finetune_server.util.aio import get_unless_done
from finetune_server.util.paths import remove_folder
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


# What a caller hears while another server exports the artifact it asked for (then that server's artifact).
_WAITING = ExportProgress(stage="waiting", fraction=0.0, message="another server is exporting it; waiting for it")


def _export_lock(art_id: str) -> str:
    return f"export:{art_id}"


def _being_deleted(what: str) -> FinetuneError:
    return FinetuneError(ErrorKind.FAILED_PRECONDITION, "BEING_DELETED", f"{what} is being deleted")


class _RunningExport:
    """One export in progress and the callers following it; each follower hears the progress from when it came."""

    def __init__(self, job_id: str, task: asyncio.Task[ArtifactRecord]) -> None:
        self.job_id = job_id
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
        self._downloads: Counter[str] = Counter()  # artifact id -> downloads streaming now
        self._deleting: set[str] = set()  # job and artifact ids being deleted: nothing new may start on them

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
            self._refuse_if_deleting(job_id, art_id)
            running = self._running.get(art_id)  # looked up before the store: a run records before it leaves
            if running is None:
                claim: StoreLock | None = None
                existing = await self._stored(art_id)
                while existing is None and claim is None:
                    claim = await asyncio.to_thread(self._store.try_lock, _export_lock(art_id))
                    if claim is None:  # another server of this store is exporting it: its record will do
                        yield _WAITING
                        await asyncio.sleep(self._settings.store_reread_s)
                    existing = await self._stored(art_id)  # perhaps recorded by the lock's previous holder
                    if existing is not None and claim is not None:
                        claim.release()
                if existing is not None:
                    yield existing
                    return
                assert claim is not None
                try:
                    running = await self._start(art_id, job, fmt, checkpoint_step, claim)
                except BaseException:
                    claim.release()
                    raise
        async for item in running.follow():
            yield item

    def _refuse_if_deleting(self, job_id: str, art_id: str) -> None:
        for name, what in ((job_id, f"job {job_id}"), (art_id, f"artifact {art_id}")):
            if name in self._deleting:
                raise _being_deleted(what)

    async def _start(
        self, art_id: str, job: JobRecord, fmt: ExportFormat, checkpoint_step: int | None, claim: StoreLock
    ) -> _RunningExport:
        """Check what the export needs, then run it as a task of its own: it goes on (and records its artifact)
        whether or not anyone still follows it, so a dropped stream loses nothing and a retry attaches. `claim`
        (this artifact's lock across the servers of the store) is released when it ends."""
        job_id, job_config = job.id, job.config
        config = TrainingConfig.from_dict(job_config)
        model = await asyncio.to_thread(resolve_model, config.model_name, self._settings)
        await asyncio.to_thread(self._check_disk, job_id, model, fmt)
        self._refuse_if_deleting(job_id, art_id)  # again: a deletion may have begun while this awaited
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
        task = asyncio.create_task(self._produce(running_id=art_id, job_id=job_id, owner=job.owner, spec=spec))
        running = _RunningExport(job_id, task)
        self._running[art_id] = running
        running.task.add_done_callback(functools.partial(self._finished, art_id))
        running.task.add_done_callback(lambda _: asyncio.get_running_loop().run_in_executor(None, claim.release))
        log.info("export.started", job_id=job_id, artifact_id=art_id, format=fmt.name)
        return running

    def _finished(self, art_id: str, task: asyncio.Task[ArtifactRecord]) -> None:
        self._running.pop(art_id, None)
        if not task.cancelled() and task.exception() is not None:  # retrieved here: followers may all be gone
            log.info("export.failed", artifact_id=art_id, error=str(task.exception()))

    async def _produce(self, *, running_id: str, job_id: str, owner: str, spec: dict[str, Any]) -> ArtifactRecord:
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
            owner=owner,  # the job's, even when an admin exported it: it answers for the artifact after the job
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

    async def get(self, art_id: str) -> ArtifactRecord:
        """The stored artifact (NOT_FOUND for an unknown one)."""
        try:
            return await asyncio.to_thread(self._store.get_artifact, art_id)
        except KeyError:
            raise unknown_artifact(art_id) from None

    async def list_artifacts(
        self, *, page_size: int, page_token: str, owner: str | None, job_id: str = ""
    ) -> tuple[list[ArtifactRecord], str]:
        if not 0 <= page_size <= 1000:
            raise FinetuneError(ErrorKind.INVALID_ARGUMENT, "INVALID_PAGE_SIZE", "page_size must be in 0..1000")
        try:
            return await asyncio.to_thread(
                lambda: self._store.list_artifacts(
                    page_size=page_size or 50, page_token=page_token, owner=owner, job_id=job_id
                )
            )
        except ValueError:
            raise FinetuneError(ErrorKind.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token is not valid") from None

    async def of_job(self, job_id: str) -> list[ArtifactRecord]:
        """Every artifact exported from a job."""
        found, token = [], ""
        while True:
            page, token = await self.list_artifacts(page_size=1000, page_token=token, owner=None, job_id=job_id)
            found.extend(page)
            if not token:
                return found

    def _check_idle(self, art_id: str) -> None:
        if art_id in self._running:
            raise FinetuneError(
                ErrorKind.FAILED_PRECONDITION,
                "ARTIFACT_IN_USE",
                f"artifact {art_id} is being exported",
                hint="Delete it once the export has ended.",
                metadata={"artifact_id": art_id},
            )
        if self._downloads[art_id]:
            raise FinetuneError(
                ErrorKind.FAILED_PRECONDITION,
                "ARTIFACT_IN_USE",
                f"artifact {art_id} is being downloaded ({self._downloads[art_id]} download(s) in progress)",
                hint="Delete it once the downloads have ended.",
                metadata={"artifact_id": art_id},
            )

    @contextlib.contextmanager
    def deleting(self, job_id: str, art_ids: list[str]) -> Iterator[None]:
        """Claim a job ("" for none) and artifacts for deletion: FAILED_PRECONDITION while an export of the job or
        of an artifact runs, or an artifact is downloaded; while claimed, no export or download of them starts."""
        names = {job_id, *art_ids} - {""}
        already = sorted(names & self._deleting)
        if already:
            raise _being_deleted(already[0])
        for art_id in art_ids:
            self._check_idle(art_id)
        exporting = sorted(a for a, r in self._running.items() if job_id and r.job_id == job_id)
        if exporting:
            raise FinetuneError(
                ErrorKind.FAILED_PRECONDITION,
                "JOB_EXPORTING",
                f"job {job_id} is being exported (artifact {exporting[0]})",
                hint="Delete the job once the export has ended.",
                metadata={"job_id": job_id, "artifact_id": exporting[0]},
            )
        self._deleting |= names
        try:
            yield
        finally:
            self._deleting -= names

    async def remove(self, record: ArtifactRecord) -> int:
        """Delete an artifact claimed with `deleting`: its folder and log first (a crash after them leaves a record
        whose retried delete finishes the work), then its record. Returns the bytes freed."""
        folder = (self._settings.data_dir / record.path).resolve()
        if not folder.is_relative_to(self._settings.artifacts_dir.resolve()) or folder.name != record.id:
            raise FinetuneError(  # never remove what is not an artifact's own folder, whatever the record says
                ErrorKind.DATA_LOSS, "ARTIFACT_PATH_UNEXPECTED", f"artifact {record.id} is recorded at {record.path!r}"
            )
        export_log = self._settings.layout.artifact_log(record.id)

        def remove_files() -> int:
            log_bytes = export_log.stat().st_size if export_log.is_file() else 0
            freed = remove_folder(folder) + log_bytes
            export_log.unlink(missing_ok=True)
            return freed

        freed = await asyncio.to_thread(remove_files)
        with contextlib.suppress(KeyError):  # another server deleted the record meanwhile: the files are gone too
            await asyncio.to_thread(self._store.delete_artifact, record.id)
        log.info("artifact.deleted", artifact_id=record.id, job_id=record.job_id, freed_bytes=freed)
        return freed

    async def delete(self, record: ArtifactRecord) -> int:
        """Delete one artifact (refused while it is exported or downloaded); returns the bytes freed."""
        with self.deleting("", [record.id]):
            return await self.remove(record)

    async def download(self, art_id: str, path: str, offset: int) -> AsyncIterator[dict[str, Any]]:
        """Chunks of one file (from `offset`) or of every file; DATA_LOSS when a file no longer matches its sha256."""
        record = await self.get(art_id)
        if art_id in self._deleting:
            raise unknown_artifact(art_id)
        self._downloads[art_id] += 1  # with the check above, in one step of the loop: a deletion sees one or other
        try:
            async for chunk in self._chunks(record, path, offset):
                yield chunk
        finally:
            self._downloads[art_id] -= 1
            if not self._downloads[art_id]:
                del self._downloads[art_id]

    async def _chunks(self, record: ArtifactRecord, path: str, offset: int) -> AsyncIterator[dict[str, Any]]:
        art_id = record.id
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
