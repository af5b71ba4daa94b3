"""The job service: accepts jobs, schedules them FIFO over device slots, runs each in a worker through the executor,
records every event, and recovers after a crash. It knows the store and the executor only by their interfaces.

Lifecycle of one job: QUEUED (persisted before Train answers) -> RUNNING (a worker is training) -> SUCCEEDED,
FAILED or CANCELLED. A worker that dies without a final word is restarted from the newest checkpoint up to
`max_attempts`.

Several servers may share one store: each has an id, claims queued jobs under a lease it renews every third of
`lease_seconds`, and writes a job's events and transitions with that lease, so a server whose lease was taken away
(it stalled, the job was re-queued and claimed elsewhere) writes nothing more and stops that attempt. Any server
re-queues jobs whose lease expired (their server died); they resume from their newest checkpoint, their events
continuing the sequence. A graceful stop gives the leases back, so another server takes the jobs at once. With a
private store (SQLite) the one server re-queues every RUNNING job it finds at start, as before leases existed.
Across servers, the store's notices wake schedulers, watchers and cancellations; a periodic re-read of the tables
covers any notice that was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog

from finetune_server.errors import ErrorKind, FinetuneError, field_error
from finetune_server.host.diskspace import ensure_free_space, job_disk_bytes
from finetune_server.jobs import idempotency
from finetune_server.jobs.active import refuse_while_used
from finetune_server.jobs.attempt_writes import AttemptWrites
from finetune_server.jobs.checkpoints import job_adapter
from finetune_server.jobs.event_hub import EventHub
from finetune_server.jobs.labels import check_labels
from finetune_server.observability.metrics import ServiceMetrics
from finetune_server.settings import ServerSettings
from finetune_server.storage import layout
from finetune_server.storage.job_store import (
    NOTICE_CANCEL,
    NOTICE_EVENT,
    NOTICE_QUEUED,
    NOTICE_RESYNC,
    InvalidTransition,
    JobStore,
    LeaseLost,
)
from finetune_server.storage.records import EventKind, JobEventRecord, JobRecord, JobState, Lease
from finetune_server.training.config import TrainingConfig
from finetune_server.training.continuation import SourceAdapter, SourceLookup
from finetune_server.training.dataset_source import training_refs
from finetune_server.training.engine.errors import out_of_memory_hint
from finetune_server.training.validation import CheckHooks, ValidationReport, validate
from finetune_server.util.paths import remove_folder
from finetune_server.util.stoppable import run_stoppable
from finetune_server.workers.executor import Executor
from finetune_server.workers.protocol import Cancelled, Error, Event, Message, Result, Started
from finetune_server.workers.supervisor import WorkerExit
from finetune_server.workers.train import WorkerSpec

log = structlog.get_logger(__name__)
T = TypeVar("T")

MAX_ATTEMPTS = 3
EVENTS_PAGE = 1000  # events read from the store per query
SCHEDULER_RETRY_S = 1.0  # after a failed claim (the store unreachable)
RESTARTED = "the server restarted; the job is queued again and resumes from its newest checkpoint"
LEASE_EXPIRED = (
    "the server running the job stopped renewing its lease; the job is queued again and resumes from its newest"
    " checkpoint"
)
STOPPING = "the server is stopping; the job is queued again and resumes from its newest checkpoint on any server"


def _same_request(job: JobRecord, digest: str) -> JobRecord:
    # Jobs stored before fingerprints existed (schema < 4) have none: they can only be taken as a retry.
    if job.request_fingerprint and job.request_fingerprint != digest:
        raise idempotency.key_reused(job.request_id, "job_id", job.id)
    return job


def job_not_found(job_id: str) -> FinetuneError:
    return FinetuneError(ErrorKind.NOT_FOUND, "JOB_NOT_FOUND", f"no job has the id {job_id!r}")


@dataclass
class _Running:
    job_id: str
    slot: int
    lease: Lease
    cancel: asyncio.Event
    task: asyncio.Task[None] | None = None
    lost: bool = False  # the lease went to another attempt: write nothing more
    writes: AttemptWrites = field(init=False)  # its store writes, in order, kept through a store outage


class JobService:
    def __init__(
        self,
        settings: ServerSettings,
        store: JobStore,
        executor: Executor,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        clock: Callable[[], float] = time.time,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._store = store
        self._executor = executor
        self._max_attempts = max_attempts
        self._clock = clock
        self.hub = EventHub()
        self.server_id = f"server-{uuid.uuid4().hex[:12]}"  # this process's leases
        self._lease_s = settings.lease_seconds
        self._running: dict[str, _Running] = {}
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []  # lease renewal, the shared store's re-read
        self._spawned: set[asyncio.Task[None]] = set()
        self._refreshing: dict[str, bool] = {}  # job id -> read again once the current read is done
        self._stop_listening: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    # -- plumbing -------------------------------------------------------------------------------------------------

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Store calls run in a thread: SQLite commits fsync, which must not stall the event loop."""
        return await asyncio.to_thread(partial(fn, *args, **kwargs))

    async def _published(self, job_id: str) -> None:
        """Hand every stored event the hub has not seen yet to the hub (one store read per write, not per watcher);
        a job's buffer goes once its final event is out."""
        while True:
            events = await self._db(self._store.events_after, job_id, self.hub.latest(job_id), EVENTS_PAGE)
            self.hub.publish(events)
            if any(e.kind is EventKind.STATE_CHANGE and JobState(e.payload["current"]).is_final for e in events):
                self.hub.forget(job_id)
                return
            if len(events) < EVENTS_PAGE:
                return

    async def _append(self, job_id: str, kind: EventKind, payload: dict[str, Any]) -> None:
        await self._db(self._store.append_event, job_id, kind, payload, now=self._clock())
        await self._published(job_id)

    async def _transition(self, job_id: str, state: JobState, **kwargs: Any) -> JobRecord:
        job, _ = await self._db(self._store.transition, job_id, state, now=self._clock(), **kwargs)
        if state.is_final and self._metrics is not None:  # before publishing: a watcher that saw the end sees it
            self._metrics.job_ended(job_id)
        await self._published(job_id)
        return job

    def job_dir(self, job_id: str) -> Path:
        return self._settings.jobs_dir / job_id

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._recover()
        self._stop_listening = self._store.listen(self._notice_from_store)
        self._scheduler = self._loop.create_task(self._schedule())
        self._loops.append(self._loop.create_task(self._keep_leases()))
        if self._store.shared:
            self._loops.append(self._loop.create_task(self._reread_periodically()))
        log.info("job_service.started", server_id=self.server_id, shared_store=self._store.shared)

    async def _recover(self) -> None:
        """Re-queue the jobs whose server died; they resume from their newest checkpoint. A private store's jobs
        left RUNNING are all this server's own (it crashed): their workers are stopped and they are re-queued at
        once. On a shared store only expired leases are (the others belong to live servers)."""
        if self._store.shared:
            await self._requeue_expired()
            return
        for job in await self._db(self._store.jobs_in_state, JobState.RUNNING):
            await self._executor.stop_leftover(self.job_dir(job.id))
        for job in await self._db(self._store.requeue_expired, now=self._clock(), message=RESTARTED, everything=True):
            await self._published(job.id)
            log.info("job.requeued_after_restart", job_id=job.id)

    async def _requeue_expired(self) -> None:
        requeued = await self._db(self._store.requeue_expired, now=self._clock(), message=LEASE_EXPIRED)
        for job in requeued:
            await self._published(job.id)
            log.info("job.requeued_after_lease_expired", job_id=job.id)
        if requeued:
            self._wake.set()

    async def stop(self) -> None:
        """Stop scheduling and stop the workers; their jobs go back to the queue (leases released) and resume from
        their newest checkpoint on whichever server takes them."""
        self._draining = True
        if self._scheduler is not None:
            self._scheduler.cancel()
        if self._stop_listening is not None:
            await asyncio.to_thread(self._stop_listening)
        for running in list(self._running.values()):
            running.cancel.set()
        await asyncio.gather(*(r.task for r in self._running.values() if r.task), return_exceptions=True)
        for task in self._loops:  # leases are renewed until the workers are gone
            task.cancel()
        await asyncio.gather(*self._loops, *self._spawned, return_exceptions=True)

    # -- leases and other servers ---------------------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Renew this server's leases every third of their length (also picking up cancellations), and re-queue
        the jobs of servers that stopped renewing theirs."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                for running in list(self._running.values()):
                    if running.lost:
                        continue
                    try:
                        job = await self._db(self._store.renew_lease, running.job_id, running.lease, self._lease_s)
                    except LeaseLost:
                        self._lose(running)
                        continue
                    if job.cancel_requested:
                        running.cancel.set()
                await self._requeue_expired()
            except Exception:  # the store may be briefly unreachable: the next round tries again
                log.exception("job_service.lease_renewal_failed")

    def _lose(self, running: _Running) -> None:
        """Another attempt owns the job now: stop this one's worker and write nothing more for it."""
        if not running.lost:
            log.warning("job.lease_lost", job_id=running.job_id, server_id=self.server_id, epoch=running.lease.epoch)
        running.lost = True
        running.cancel.set()

    def _notice_from_store(self, kind: str, job_id: str) -> None:
        """The store's listener thread hands a notice to the event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._on_notice, kind, job_id)

    def _on_notice(self, kind: str, job_id: str) -> None:
        if kind == NOTICE_QUEUED:
            self._wake.set()
        elif kind == NOTICE_EVENT:  # written by another server (a cancel's log line, the job itself)
            if self.hub.is_watched(job_id):
                self._spawn(self._refresh(job_id))
        elif kind == NOTICE_CANCEL:
            running = self._running.get(job_id)
            if running is not None:
                running.cancel.set()
        elif kind == NOTICE_RESYNC:
            self._spawn(self._reread())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    async def _refresh(self, job_id: str) -> None:
        """Read another server's new events of a watched job into the hub; reads asked for meanwhile coalesce."""
        if job_id in self._refreshing:
            self._refreshing[job_id] = True
            return
        self._refreshing[job_id] = False
        try:
            while True:
                await self._published(job_id)
                if not self._refreshing[job_id]:
                    return
                self._refreshing[job_id] = False
        except KeyError:
            pass
        finally:
            del self._refreshing[job_id]

    async def _reread(self) -> None:
        """What notices would have said, from the tables: queued jobs, watched jobs' events, cancellations."""
        self._wake.set()
        for job_id in self.hub.watched():
            await self._refresh(job_id)
        for running in list(self._running.values()):
            job = await self._db(self._store.get_job, running.job_id)
            if job.cancel_requested:
                running.cancel.set()

    async def _reread_periodically(self) -> None:
        """The fallback for lost notices: they then delay by at most this interval, never lose."""
        while True:
            await asyncio.sleep(self._settings.store_reread_s)
            try:
                await self._reread()
            except Exception:
                log.exception("job_service.reread_failed")

    # -- requests -------------------------------------------------------------------------------------------------

    async def submit(
        self,
        config: TrainingConfig,
        *,
        request_id: str = "",
        display_name: str = "",
        owner: str = "",
        labels: Mapping[str, str] | None = None,
        visible_owner: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Validate exactly as ValidateConfig does, then persist the job as QUEUED. Idempotent on the owner's
        request_id: a retry returns its job; the key with another config is ALREADY_EXISTS naming that job.
        `visible_owner`: whose jobs init_from_job may name (None: anyone's)."""
        labels = check_labels(labels or {})
        digest = idempotency.fingerprint(config.to_dict()) if request_id else ""
        if request_id:
            existing = await self._db(self._store.find_by_request_id, request_id, owner)
            if existing is not None:
                return _same_request(existing, digest), False
        # Stopped, like ValidateConfig, when the caller goes.
        report = await self.validate(config, visible_owner=visible_owner)
        if not report.valid:
            raise report.rejection()
        estimate = report.memory_estimate
        keep = report.resolved_config.save_total_limit or 0
        needed = job_disk_bytes(estimate.trainable_parameters if estimate else 0, keep)
        ensure_free_space(self._settings.jobs_dir, needed, self._settings.disk_reserve_bytes, "this job")
        queued = await self._db(self._store.count_in_state, JobState.QUEUED)
        if queued >= self._settings.max_queued_jobs:
            raise FinetuneError(
                ErrorKind.RESOURCE_EXHAUSTED,
                "QUEUE_FULL",
                f"{queued} jobs are already queued (the limit is {self._settings.max_queued_jobs})",
                hint="Wait for queued jobs to start, or cancel some.",
            )
        job, created = await self._db(
            self._store.create_job,
            job_id=f"job-{uuid.uuid4().hex[:16]}",
            config=report.resolved_config.to_dict(),
            request_id=request_id,
            request_fingerprint=digest,
            display_name=display_name,
            owner=owner,
            labels=labels,
            now=self._clock(),
        )
        if not created:  # a concurrent call with the same key won the race
            return _same_request(job, digest), False
        await self._published(job.id)
        log.info("job.queued", job_id=job.id, model=config.model_name)
        self._wake.set()
        return job, created

    async def validate(
        self,
        config: TrainingConfig,
        target_device: str = "",
        *,
        on_progress: Callable[[str, int, int | None], None] | None = None,
        timeout_s: float | None = None,
        visible_owner: str | None = None,
    ) -> ValidationReport:
        """What ValidateConfig answers and Train checks: the config's own checks, then whether the executor could
        place a job at all. Off the event loop (it reads and tokenizes the dataset), and stopped when the awaiting
        caller is cancelled or `timeout_s` passes (CheckStopped). init_from_job may name a job of `visible_owner`
        only (None: of anyone); another's is reported as unknown, as if it did not exist."""

        def checked(should_stop: Callable[[], bool]) -> ValidationReport:
            problem = self._executor.placement_problem() or ""
            hooks = CheckHooks(should_stop=should_stop, on_progress=on_progress)
            return validate(
                config,
                self._settings,
                target_device=target_device,
                placement_problem=problem,
                hooks=hooks,
                source_lookup=self._source_lookup(visible_owner),
            )

        return await run_stoppable(checked, timeout_s=timeout_s)

    def _source_lookup(self, visible_owner: str | None) -> SourceLookup:
        """Find the adapter a continued job starts from (in a thread: it reads the store and the disk)."""

        def lookup(job_id: str, step: int | None) -> SourceAdapter:
            try:
                job = self._store.get_job(job_id)
            except KeyError:
                job = None
            if job is None or (visible_owner is not None and job.owner != visible_owner):
                unknown = f"no job has the id {job_id!r}"
                raise field_error(ErrorKind.NOT_FOUND, "JOB_NOT_FOUND", "init_from_job", unknown)
            found = job_adapter(
                job, self.job_dir(job.id), step, job_field="init_from_job", step_field="init_from_checkpoint"
            )
            config = TrainingConfig.from_dict(job.config)
            return SourceAdapter(job.id, step, config, found.adapter_dir, found.checkpoint_dir)

        return lookup

    async def get(self, job_id: str) -> JobRecord:
        try:
            return await self._db(self._store.get_job, job_id)
        except KeyError:
            raise job_not_found(job_id) from None

    async def list(
        self,
        *,
        states: list[JobState],
        page_size: int,
        page_token: str,
        owner: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> tuple[list[JobRecord], str]:
        if not 0 <= page_size <= 1000:
            raise FinetuneError(ErrorKind.INVALID_ARGUMENT, "INVALID_PAGE_SIZE", "page_size must be in 0..1000")
        wanted = check_labels(labels or {})
        try:
            return await self._db(
                self._store.list_jobs,
                states=states or None,
                page_size=page_size or 50,
                page_token=page_token,
                owner=owner,
                labels=wanted,
            )
        except ValueError:
            raise FinetuneError(ErrorKind.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token is not valid") from None

    @staticmethod
    def check_deletable(job: JobRecord) -> None:
        """FAILED_PRECONDITION, naming the state, for a job that has not ended (its worker may still write)."""
        if not job.state.is_final:
            raise FinetuneError(
                ErrorKind.FAILED_PRECONDITION,
                "JOB_NOT_FINISHED",
                f"job {job.id} is {job.state.value}; only a job that has ended (SUCCEEDED, FAILED or CANCELLED) can"
                " be deleted",
                hint=f"Cancel job {job.id} first, or wait for it to end.",
                metadata={"job_id": job.id, "state": job.state.value},
            )

    async def check_not_continued(self, job: JobRecord) -> None:
        """FAILED_PRECONDITION `JOB_IN_USE`, naming it, while a queued or running job continues from this one's
        adapter (each attempt of it reads that adapter at its start)."""
        await refuse_while_used(
            self._store,
            lambda other: other.config.get("init_from_job") == job.id,
            what=f"job {job.id}",
            reason="JOB_IN_USE",
            how="continued by",
        )

    async def delete(self, job: JobRecord) -> int:
        """Delete an ended job: its folder first (a crash after it leaves a record whose retried delete finishes
        the work, never a folder nothing names), then its record with its events. Returns the bytes freed."""
        self.check_deletable(job)
        freed = await asyncio.to_thread(remove_folder, self.job_dir(job.id))
        try:
            await self._db(self._store.delete_job, job.id)
        except KeyError:
            raise job_not_found(job.id) from None  # deleted meanwhile by another call
        self.hub.forget(job.id)
        log.info("job.deleted", job_id=job.id, freed_bytes=freed)
        return freed

    async def cancel(self, job_id: str) -> JobRecord:
        job = await self.get(job_id)
        if job.state.is_final:
            raise FinetuneError(
                ErrorKind.FAILED_PRECONDITION,
                "JOB_FINISHED",
                f"job {job_id} already ended as {job.state.value}",
            )
        if job.state is JobState.QUEUED:
            try:
                return await self._transition(
                    job_id, JobState.CANCELLED, expect=[JobState.QUEUED], message="cancelled while queued"
                )
            except InvalidTransition:
                job = await self.get(job_id)  # it started meanwhile: cancel the running worker instead
        job = await self._db(self._store.request_cancel, job_id)
        running = self._running.get(job_id)
        if running is not None:
            running.cancel.set()
        await self._append(job_id, EventKind.LOG, {"level": "INFO", "message": "cancel requested"})
        return job

    async def watch(self, job_id: str, after_sequence: int = 0) -> AsyncIterator[JobEventRecord]:
        """Stored events after `after_sequence`, then live ones, until the job's final event has been sent."""
        job = await self.get(job_id)
        if after_sequence < 0 or after_sequence > job.last_sequence:
            raise FinetuneError(
                ErrorKind.INVALID_ARGUMENT,
                "SEQUENCE_OUT_OF_RANGE",
                f"after_sequence must be in 0..{job.last_sequence} (the job's newest event), got {after_sequence}",
            )
        last = after_sequence
        while True:
            events = self.hub.recent_after(job_id, last)
            if events is None:
                events = await self._db(self._store.events_after, job_id, last)
            for event in events:
                yield event
                last = event.sequence
                if event.kind is EventKind.STATE_CHANGE and JobState(event.payload["current"]).is_final:
                    return
            if not events:
                job = await self.get(job_id)
                if job.last_sequence > last:  # another server wrote them: bring the hub up to the store
                    await self._published(job_id)
                elif job.state.is_final:
                    return
                else:
                    await self.hub.wait_beyond(job_id, last)

    # -- scheduling -----------------------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        """FIFO over slots: claim the oldest queued job (of every server's queue) whenever a slot is free."""
        while not self._draining:
            self._wake.clear()
            free = sorted(set(range(self._settings.slots)) - {r.slot for r in self._running.values()})
            try:
                for slot in free:
                    job = await self._db(
                        self._store.claim_next,
                        self.server_id,
                        self._lease_s,
                        now=self._clock(),
                        message=f"a worker is starting on slot {slot}",
                    )
                    if job is None:
                        break
                    self._launch(job, slot)
                    await self._published(job.id)
            except Exception:  # the store may be briefly unreachable: try again shortly, never stop scheduling
                log.exception("job_service.claim_failed")
                await asyncio.sleep(SCHEDULER_RETRY_S)
                continue
            await self._wake.wait()

    def _launch(self, job: JobRecord, slot: int) -> None:
        assert job.lease is not None  # claimed: the store gave it a lease
        running = _Running(job.id, slot, job.lease, asyncio.Event())
        running.writes = AttemptWrites(job.id, partial(self._lose, running))
        if job.cancel_requested:
            running.cancel.set()
        self._running[job.id] = running
        running.task = asyncio.get_running_loop().create_task(self._run(job, running))

    def _spec(self, job: JobRecord, slot: int) -> WorkerSpec:
        config = TrainingConfig.from_dict(job.config)
        model_ref, dataset_ref, eval_dataset_ref = training_refs(config, self._settings)
        init_adapter = init_optimizer = None
        # A continued job starts from its source's adapter until it has a checkpoint of its own to resume from.
        if config.init_from_job and not layout.JobDir(self.job_dir(job.id)).complete_checkpoints():
            source = self._source_lookup(None)(config.init_from_job, config.init_from_checkpoint)
            init_adapter = str(source.adapter_dir)
            if config.resume_optimizer and source.checkpoint_dir is not None:
                init_optimizer = str(source.checkpoint_dir)
        return WorkerSpec(
            job_id=job.id,
            config=job.config,
            model_ref=model_ref,
            dataset_path=dataset_ref,
            eval_dataset_path=eval_dataset_ref,
            output_dir=str(self.job_dir(job.id)),
            hub_cache_dir=str(self._settings.hf_cache_dir) if self._settings.hf_cache_dir else None,
            hub_offline=self._settings.offline,
            gpu_slot=slot,
            data_dir=str(self._settings.data_dir),
            cpu_threads=self._settings.threads_per_worker,
            cpus=self._settings.worker_cpus or None,
            token_cache_max_bytes=self._settings.token_cache_max_bytes,
            init_adapter_dir=init_adapter,
            init_optimizer_dir=init_optimizer,
        )

    async def _run(self, job: JobRecord, running: _Running) -> None:
        bound = log.bind(job_id=job.id, lease_epoch=running.lease.epoch)
        try:
            await self._attempts(job, running, bound)
        except LeaseLost:
            self._lose(running)
        except Exception as exc:  # the service must survive anything a job does
            bound.exception("job.supervision_failed")
            error = {"reason": "INTERNAL", "message": f"the server could not run the job: {exc}"}
            try:
                await self._fail(running, error)
            except LeaseLost:
                self._lose(running)
        finally:
            await running.writes.close()
            self._running.pop(job.id, None)
            self._wake.set()

    async def _attempts(self, job: JobRecord, running: _Running, bound: Any) -> None:
        try:
            spec = await asyncio.to_thread(self._spec, job, running.slot)
        except FinetuneError as exc:  # the model or dataset vanished since the job was accepted
            await self._fail(running, {"reason": exc.reason, "message": exc.message, "hint": exc.hint})
            return
        job_dir = self.job_dir(job.id)
        try:  # the disk may have filled while the job was queued
            ensure_free_space(job_dir, 0, self._settings.disk_reserve_bytes, "this job")
        except FinetuneError as exc:
            await self._fail(running, {"reason": exc.reason, "message": exc.message, "hint": exc.hint})
            return
        while True:
            job = await running.writes.call(partial(self._db, self._store.record_attempt, job.id, resumed=False))
            outcome = await self._executor.run(
                spec,
                on_message=partial(self._on_worker_message, running),
                cancel=running.cancel,
                log_path=layout.JobDir(job_dir).worker_log,
            )
            if await self._settle(job, outcome, running, bound):
                return

    async def _settle(self, job: JobRecord, outcome: WorkerExit, running: _Running, bound: Any) -> bool:
        """Record how a worker ended. True when the job is settled; False to start another attempt."""
        if running.lost:  # another attempt owns the job: this one says nothing more
            bound.warning("job.attempt_abandoned_after_lease_lost")
            return True
        final, cancel = outcome.final, running.cancel
        if isinstance(final, Result):
            result = dict(final.data)
            await self._end(running, JobState.SUCCEEDED, result=result, message="training finished")
            bound.info("job.succeeded", steps=result.get("steps"))
            return True
        if self._draining:  # the server is stopping: another server (or the next start) resumes the job
            await self._release_for_resume(running, bound)
            return True
        if isinstance(final, Cancelled) or (cancel.is_set() and not isinstance(final, Error)):
            await self._end(running, JobState.CANCELLED, message="cancelled")
            return True
        if isinstance(final, Error):
            error = {"reason": final.reason, "message": final.message, "hint": final.hint, "step": final.step}
            await self._fail(running, error)
            return True
        # No final word: the worker died. Retry from the newest checkpoint while attempts remain.
        how = outcome.how
        if outcome.oom_killed:
            await self._fail(
                running,
                {
                    "reason": "OUT_OF_MEMORY",
                    "message": f"the worker was killed for using too much memory ({how})",
                    "hint": out_of_memory_hint(TrainingConfig.from_dict(job.config)),
                },
            )
            return True
        current = await running.writes.call(partial(self.get, job.id))
        if current.attempts >= self._max_attempts:
            tail = "\n".join(outcome.log_tail[-15:])
            await self._fail(
                running,
                {
                    "reason": "WORKER_CRASHED",
                    "message": f"the worker died ({how}) {current.attempts} times; last log lines:\n{tail}",
                    "hint": "Check the job's {layout.WORKER_LOG_FILE}; the newest checkpoint is kept.",
                },
            )
            return True
        message = f"the worker died ({how}); restarting from the newest checkpoint (attempt {current.attempts + 1})"
        await self._attempt_event(running, EventKind.LOG, {"level": "WARNING", "message": message})
        bound.warning("job.worker_died", how=how, attempts=current.attempts)
        return False

    async def _fail(self, running: _Running, error: dict[str, Any]) -> None:
        await self._end(running, JobState.FAILED, error=error, message="failed")

    async def _end(self, running: _Running, state: JobState, **kwargs: Any) -> None:
        """An attempt's final transition, after every event it queued, waiting out a store outage."""
        job_id = running.job_id
        await running.writes.call(
            lambda: self._db(
                self._store.transition,
                job_id,
                state,
                now=self._clock(),
                expect=[JobState.RUNNING],
                lease=running.lease,
                **kwargs,
            )
        )
        if state.is_final and self._metrics is not None:  # before publishing: a watcher that saw the end sees it
            self._metrics.job_ended(job_id)
        await running.writes.call(partial(self._published, job_id))

    async def _release_for_resume(self, running: _Running, bound: Any) -> None:
        """The server is stopping: what the attempt queued lands, then its lease goes back. The store must answer
        within a lease's length; if it does not, the lease expires instead and the job resumes all the same."""
        job_id = running.job_id
        release = partial(self._db, self._store.release_lease, job_id, running.lease, message=STOPPING)
        try:
            await asyncio.wait_for(running.writes.call(lambda: release(now=self._clock())), timeout=self._lease_s)
        except TimeoutError:
            bound.warning("job.lease_left_to_expire", reason="the job store did not answer while stopping")
            return
        with contextlib.suppress(FinetuneError):  # watchers of other servers re-read the store anyway
            await self._published(job_id)
        bound.info("job.released_for_resume")

    async def _attempt_event(self, running: _Running, kind: EventKind, payload: dict[str, Any]) -> None:
        """One event of a running attempt, stamped now and written in order (queued through a store outage)."""
        job_id = running.job_id
        append = partial(self._store.append_event, job_id, kind, payload, now=self._clock(), lease=running.lease)
        await running.writes.write(partial(self._db, append))
        await running.writes.write(partial(self._published, job_id))

    async def _on_worker_message(self, running: _Running, message: Message) -> None:
        """Persist what the worker reports, in order, before reading its next message; while the store is
        unreachable the writes queue (the worker keeps training) and land when it is back. Nothing once the lease
        is lost (the worker is being stopped)."""
        if running.lost:
            return
        job_id = running.job_id
        if isinstance(message, Event):
            if message.kind == EventKind.PROGRESS.value and self._metrics is not None:
                self._metrics.on_progress(job_id, message.data)  # before publishing, like job_ended
            await self._attempt_event(running, EventKind(message.kind), message.data)
        elif isinstance(message, Started):
            step = message.resumed_from_step
            if step is None:
                return
            await running.writes.write(partial(self._db, self._store.record_resume, job_id))
            resumed = {"level": "INFO", "message": f"resumed from the checkpoint at step {step}"}
            await self._attempt_event(running, EventKind.LOG, resumed)
