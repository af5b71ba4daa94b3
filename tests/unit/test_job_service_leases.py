"""The job service's side of leases, on both stores: a lost lease stops the attempt and writes nothing more, a
graceful stop gives the job back to the queue for another server, a dead server's expired lease is re-queued.

The executor here is a scripted one (the executor is the service's seam); the stores are real databases.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from finetune_server.jobs.service import LEASE_EXPIRED, RESTARTED, STOPPING, JobService
from finetune_server.settings import ServerSettings
from finetune_server.storage.job_store import JobStore, SqliteJobStore
from finetune_server.storage.postgres_store import PostgresJobStore
from finetune_server.storage.records import EventKind, JobState
from finetune_server.training.config import TrainingConfig
from finetune_server.workers.protocol import Cancelled, Event, Message
from finetune_server.workers.supervisor import OnMessage, WorkerExit
from finetune_server.workers.train import WorkerSpec

from ..conftest import write_alpaca

DEADLINE_S = 20


class ScriptedExecutor:
    """Runs no worker: reports one log line, then sends what the test hands it until cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.outbox: asyncio.Queue[Message] = asyncio.Queue()

    async def run(
        self, spec: WorkerSpec, *, on_message: OnMessage, cancel: asyncio.Event, log_path: Path
    ) -> WorkerExit:
        await on_message(Event(kind="log", data={"level": "INFO", "message": "worker up"}))
        self.started.set()
        cancelled = asyncio.create_task(cancel.wait())
        while not cancel.is_set():
            sending = asyncio.create_task(self.outbox.get())
            await asyncio.wait({sending, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if sending.done():
                await on_message(sending.result())
            else:
                sending.cancel()
        self.cancelled.set()
        return WorkerExit(pid=0, returncode=0, signal=None, final=Cancelled(step=0))

    async def stop_leftover(self, job_dir: Path) -> None:
        return None


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], JobStore]:
    if request.param == "sqlite":
        return lambda: SqliteJobStore(tmp_path / "jobs.db")
    url = request.getfixturevalue("postgres_url")
    return lambda: PostgresJobStore(url)


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> ServerSettings:
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    write_alpaca(datasets / "facts.jsonl")
    return ServerSettings(
        data_dir=tmp_path / "data", model_roots=[tiny_model_dir.parent], dataset_roots=[datasets], lease_seconds=0.6
    )


@pytest.fixture
async def store(open_store: Callable[[], JobStore]) -> AsyncIterator[JobStore]:
    opened = open_store()
    yield opened
    opened.close()


def queue_job(store: JobStore, model: str, job_id: str = "job-1") -> None:
    config = TrainingConfig(model_name=model, dataset="facts.jsonl", max_steps=2).to_dict()
    store.create_job(job_id=job_id, config=config, now=1.0)


async def started(settings: ServerSettings, store: JobStore) -> tuple[JobService, ScriptedExecutor]:
    executor = ScriptedExecutor()
    service = JobService(settings, store, executor)
    await service.start()
    await asyncio.wait_for(executor.started.wait(), DEADLINE_S)
    return service, executor


def steal(store: JobStore) -> None:
    """What another server does once it believes the lease expired: re-queue the job, then claim it."""
    store.requeue_expired(now=2.0, message="taken", everything=True)
    assert store.claim_next("server-other", 300, now=3.0) is not None


@pytest.mark.parametrize("noticed_by", ["the next write", "the heartbeat"])
async def test_a_lost_lease_stops_the_attempt_and_nothing_more_is_written(
    settings: ServerSettings, store: JobStore, tiny_model_dir: Path, noticed_by: str
) -> None:
    if noticed_by == "the next write":
        settings.lease_seconds = 300  # the heartbeat stays quiet: the write finds out
    queue_job(store, tiny_model_dir.name)
    service, executor = await started(settings, store)
    assert store.get_job("job-1").lease_owner == service.server_id
    steal(store)
    taken = store.get_job("job-1")
    if noticed_by == "the next write":
        await executor.outbox.put(Event(kind="progress", data={"step": 1, "total_steps": 2}))
    await asyncio.wait_for(executor.cancelled.wait(), DEADLINE_S)
    await service.stop()
    job = store.get_job("job-1")
    assert (job.state, job.lease_owner, job.lease_epoch) == (JobState.RUNNING, "server-other", 2)
    assert job.last_sequence == taken.last_sequence, "the attempt that lost its lease wrote nothing more"
    assert job.progress is None


async def test_a_graceful_stop_gives_the_job_back_and_another_server_takes_it(
    settings: ServerSettings, open_store: Callable[[], JobStore], store: JobStore, tiny_model_dir: Path
) -> None:
    queue_job(store, tiny_model_dir.name)
    first, _ = await started(settings, store)
    await first.stop()
    job = store.get_job("job-1")
    assert (job.state, job.lease_owner) == (JobState.QUEUED, "")
    last = store.events_after("job-1", job.last_sequence - 1)[0]
    assert last.kind is EventKind.STATE_CHANGE and last.payload["message"] == STOPPING

    other_store = open_store()
    try:
        second, _ = await started(settings, other_store)
        job = store.get_job("job-1")
        assert (job.state, job.lease_owner, job.lease_epoch) == (JobState.RUNNING, second.server_id, 2)
        await second.stop()
    finally:
        other_store.close()
    events = store.events_after("job-1", 0)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


async def test_a_dead_servers_job_is_requeued_and_resumed_under_the_same_id(
    settings: ServerSettings, store: JobStore, tiny_model_dir: Path
) -> None:
    queue_job(store, tiny_model_dir.name)
    assert store.claim_next("server-dead", 0.0, now=2.0) is not None  # it never renews: expired at once
    service, _ = await started(settings, store)
    job = store.get_job("job-1")
    assert (job.state, job.lease_owner, job.lease_epoch) == (JobState.RUNNING, service.server_id, 2)
    messages = [e.payload["message"] for e in store.events_after("job-1", 0) if e.kind is EventKind.STATE_CHANGE]
    # A private store's one server re-queues its own leftovers at start; on a shared one the lease had expired.
    assert messages[2] == (LEASE_EXPIRED if store.shared else RESTARTED)
    await service.stop()


async def test_start_up_takes_no_live_job_from_another_server_on_a_shared_store(
    settings: ServerSettings, store: JobStore, tiny_model_dir: Path
) -> None:
    queue_job(store, tiny_model_dir.name)
    assert store.claim_next("server-alive", 300, now=2.0) is not None
    executor = ScriptedExecutor()
    service = JobService(settings, store, executor)
    await service.start()  # start-up recovery is done when start returns
    try:
        job = store.get_job("job-1")
        if store.shared:  # the other server is alive: its job stays its own
            assert (job.state, job.lease_owner, job.lease_epoch) == (JobState.RUNNING, "server-alive", 1)
        else:  # one server per private store: what it finds RUNNING is its own leftover, re-queued and resumed
            await asyncio.wait_for(executor.started.wait(), DEADLINE_S)
            job = store.get_job("job-1")
            assert (job.lease_owner, job.lease_epoch) == (service.server_id, 2)
    finally:
        await service.stop()
