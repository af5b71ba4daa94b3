"""The JobStore contract, on SQLite and on PostgreSQL: durable jobs, gap-free event sequences, idempotent creates and
uploads, leases and claims, migrations. Tests that only concern one database's own mechanics say so in their name."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from finetune_server.storage.job_store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    InvalidTransition,
    JobStore,
    LeaseLost,
    SchemaTooNewError,
    SqliteJobStore,
    apply_migrations,
)
from finetune_server.storage.postgres_store import PostgresJobStore
from finetune_server.storage.records import ArtifactRecord, DatasetRecord, EventKind, JobState, Lease

CONFIG = {"model": "Qwen/Qwen2.5-0.5B-Instruct", "dataset": "data.jsonl", "lora": {"r": 8}}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.sqlite3"


StoreFactory = Callable[[], JobStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, db_path: Path) -> Iterator[StoreFactory]:
    """Opens another store on this test's own database (each call: a new connection, as another server would)."""
    opened: list[JobStore] = []

    if request.param == "sqlite":

        def make() -> JobStore:
            return SqliteJobStore(db_path)

    else:
        url = request.getfixturevalue("postgres_url")

        def make() -> JobStore:
            return PostgresJobStore(url)

    def tracked() -> JobStore:
        store = make()
        opened.append(store)
        return store

    yield tracked
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: StoreFactory) -> JobStore:
    return open_store()


@pytest.fixture
def sqlite_store(db_path: Path) -> Iterator[SqliteJobStore]:
    s = SqliteJobStore(db_path)
    yield s
    s.close()


def _pragma(path: Path, name: str) -> object:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def test_sqlite_opens_in_wal_mode_with_full_sync(sqlite_store: SqliteJobStore, db_path: Path) -> None:
    store = sqlite_store
    assert _pragma(db_path, "journal_mode") == "wal"
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store._conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0


# -- create / get / list ------------------------------------------------------------------------------------------


def test_create_job_is_queued_with_its_first_event(store: JobStore) -> None:
    job, created = store.create_job(
        job_id="job-1", config=CONFIG, request_id="req-1", display_name="first", owner="alice", now=100.0
    )
    assert created
    assert job.state is JobState.QUEUED
    assert (job.config, job.request_id, job.display_name, job.owner) == (CONFIG, "req-1", "first", "alice")
    assert job.create_time == 100.0
    assert job.last_sequence == 1
    assert job.queue_position == 1

    assert store.get_job("job-1") == job
    [event] = store.events_after("job-1", 0)
    assert (event.sequence, event.kind, event.time) == (1, EventKind.STATE_CHANGE, 100.0)
    assert event.payload == {"previous": None, "current": "QUEUED", "message": "queued"}

    second, _ = store.create_job(job_id="job-2", config=CONFIG, now=101.0)
    assert second.queue_position == 2


def test_unknown_ids_raise_key_error(store: JobStore) -> None:
    for call in (
        lambda: store.get_job("nope"),
        lambda: store.append_event("nope", EventKind.LOG, {"level": "INFO", "message": "x"}, now=1.0),
        lambda: store.transition("nope", JobState.RUNNING, now=1.0),
        lambda: store.events_after("nope", 0),
        lambda: store.request_cancel("nope"),
        lambda: store.record_attempt("nope", resumed=False),
        lambda: store.get_dataset("ds-nope"),
    ):
        with pytest.raises(KeyError):
            call()
    assert store.find_by_request_id("nope") is None
    assert store.find_by_request_id("") is None
    assert store.find_dataset_by_sha256("0" * 64) is None


def test_duplicate_job_id_without_request_id_is_rejected(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    with pytest.raises(ValueError, match="already exists"):
        store.create_job(job_id="job-1", config={"other": True}, now=2.0)
    assert store.get_job("job-1").config == CONFIG
    assert store.get_job("job-1").last_sequence == 1


def test_list_jobs_pages_newest_first_with_filters(store: JobStore) -> None:
    # Two jobs share a create_time so the id must break the tie for stable paging.
    # job-c is inserted before job-b so insertion order and id order disagree.
    times = {"job-a": 1.0, "job-c": 2.0, "job-b": 2.0, "job-d": 3.0, "job-e": 4.0}
    for job_id, t in times.items():
        store.create_job(job_id=job_id, config=CONFIG, owner="bob" if job_id in ("job-b", "job-e") else "", now=t)
    store.transition("job-c", JobState.RUNNING, now=5.0)

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = store.list_jobs(states=None, page_size=2, page_token=token)
        seen += [j.id for j in page]
        pages += 1
        if not token:
            break
    assert seen == ["job-e", "job-d", "job-c", "job-b", "job-a"]
    assert pages == 3

    exact, token = store.list_jobs(states=None, page_size=5, page_token="")
    assert len(exact) == 5
    assert token == ""

    queued, _ = store.list_jobs(states=[JobState.QUEUED], page_size=10, page_token="")
    assert [j.id for j in queued] == ["job-e", "job-d", "job-b", "job-a"]
    running, _ = store.list_jobs(states={JobState.RUNNING, JobState.FAILED}, page_size=10, page_token="")
    assert [j.id for j in running] == ["job-c"]
    everything, _ = store.list_jobs(states=[], page_size=10, page_token="")
    assert len(everything) == 5

    bobs, token = store.list_jobs(states=None, page_size=1, page_token="", owner="bob")
    assert [j.id for j in bobs] == ["job-e"]
    bobs, token = store.list_jobs(states=None, page_size=1, page_token=token, owner="bob")
    assert [j.id for j in bobs] == ["job-b"]
    assert token == ""


@pytest.mark.parametrize("token", ["not base64 !!", "bm9wZQ", "WzEsMiwzXQ", "eyJhIjoxLCJiIjoyfQ", "WyJ4IiwieSJd"])
def test_list_jobs_rejects_malformed_tokens(store: JobStore, token: str) -> None:
    # "nope", [1,2,3], {"a":1,"b":2}, ["x","y"]
    with pytest.raises(ValueError, match="page_token"):
        store.list_jobs(states=None, page_size=10, page_token=token)


def test_list_jobs_rejects_non_positive_page_size(store: JobStore) -> None:
    with pytest.raises(ValueError, match="page_size"):
        store.list_jobs(states=None, page_size=0, page_token="")


# -- request_id idempotency -----------------------------------------------------------------------------------------


def test_request_id_makes_create_idempotent(store: JobStore) -> None:
    first, created = store.create_job(job_id="job-1", config=CONFIG, request_id="req", now=1.0)
    again, created_again = store.create_job(job_id="job-2", config={"other": 1}, request_id="req", now=2.0)
    assert created and not created_again
    assert again == first
    assert store.find_by_request_id("req") == first
    assert store.count_in_state(JobState.QUEUED) == 1
    assert store.get_job("job-1").last_sequence == 1  # no second "queued" event
    with pytest.raises(KeyError):
        store.get_job("job-2")
    # Empty request ids are not keys: any number of jobs may have none.
    store.create_job(job_id="job-3", config=CONFIG, now=3.0)
    store.create_job(job_id="job-4", config=CONFIG, now=4.0)
    assert store.count_in_state(JobState.QUEUED) == 3


@pytest.mark.parametrize("connections", [1, 2])
def test_racing_creates_with_one_request_id_make_one_job(open_store: StoreFactory, connections: int) -> None:
    stores = [open_store() for _ in range(connections)]
    barrier = threading.Barrier(8)
    results: list[tuple[str, bool]] = []
    errors: list[BaseException] = []

    def create(i: int) -> None:
        try:
            barrier.wait()
            job, created = stores[i % connections].create_job(
                job_id=f"job-{i}", config=CONFIG, request_id="same", now=float(i)
            )
            results.append((job.id, created))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(created for _, created in results) == 1
    assert len({job_id for job_id, _ in results}) == 1
    assert stores[0].count_in_state(JobState.QUEUED) == 1
    assert stores[0].get_job(results[0][0]).last_sequence == 1
    for s in stores:
        s.close()


# -- events ---------------------------------------------------------------------------------------------------------


def test_append_event_numbers_events_and_keeps_progress(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    log = store.append_event("job-1", EventKind.LOG, {"level": "INFO", "message": "hello"}, now=2.0)
    progress = {"step": 3, "total_steps": 10, "loss": float("nan")}
    prog = store.append_event("job-1", EventKind.PROGRESS, progress, now=3.0)
    assert (log.sequence, prog.sequence) == (2, 3)

    job = store.get_job("job-1")
    assert job.last_sequence == 3
    assert job.progress is not None
    assert job.progress["step"] == 3
    assert math.isnan(job.progress["loss"])  # a NaN loss is stored, not refused

    store.append_event("job-1", EventKind.LOG, {"level": "INFO", "message": "after"}, now=4.0)
    assert store.get_job("job-1").progress is not None  # only PROGRESS events replace it
    assert store.get_job("job-1").progress["step"] == 3  # type: ignore[index]


def test_events_after_returns_the_tail_in_order(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    store.create_job(job_id="job-2", config=CONFIG, now=1.0)
    for i in range(2, 11):
        store.append_event("job-1", EventKind.LOG, {"level": "INFO", "message": str(i)}, now=float(i))
    store.append_event("job-2", EventKind.LOG, {"level": "INFO", "message": "other"}, now=1.0)

    assert [e.sequence for e in store.events_after("job-1", 0)] == list(range(1, 11))
    tail = store.events_after("job-1", 7)
    assert [e.sequence for e in tail] == [8, 9, 10]
    assert [e.payload["message"] for e in tail] == ["8", "9", "10"]
    assert all(e.job_id == "job-1" for e in tail)
    assert [e.sequence for e in store.events_after("job-1", 3, limit=2)] == [4, 5]
    assert store.events_after("job-1", 10) == []


@pytest.mark.parametrize("connections", [1, 2])
def test_concurrent_appends_are_gap_free(open_store: StoreFactory, connections: int) -> None:
    stores = [open_store() for _ in range(connections)]
    stores[0].create_job(job_id="job-1", config=CONFIG, now=0.0)
    per_thread = 20
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def append(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                stores[t % connections].append_event(
                    "job-1", EventKind.LOG, {"level": "INFO", "message": f"{t}:{i}"}, now=1.0
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    events = stores[0].events_after("job-1", 0, limit=10_000)
    assert [e.sequence for e in events] == list(range(1, 8 * per_thread + 2))
    assert sorted(e.payload["message"] for e in events[1:]) == sorted(
        f"{t}:{i}" for t in range(8) for i in range(per_thread)
    )
    assert stores[0].get_job("job-1").last_sequence == 8 * per_thread + 1
    for s in stores:
        s.close()


# -- transitions ----------------------------------------------------------------------------------------------------


def test_transition_sets_state_times_and_appends_state_change(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    job, event = store.transition("job-1", JobState.RUNNING, now=2.0, message="started", expect=[JobState.QUEUED])
    assert job.state is JobState.RUNNING
    assert (job.start_time, job.end_time) == (2.0, None)
    assert event.kind is EventKind.STATE_CHANGE
    assert event.sequence == job.last_sequence == 2
    assert event.payload == {"previous": "QUEUED", "current": "RUNNING", "message": "started"}

    # Re-queued after a crash and started again: start_time stays the first start, queue place is kept.
    store.transition("job-1", JobState.QUEUED, now=3.0, message="worker crashed")
    job, _ = store.transition("job-1", JobState.RUNNING, now=4.0)
    assert job.start_time == 2.0
    assert job.queue_position == 1


def test_transition_rejects_unexpected_state_without_writing(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    with pytest.raises(InvalidTransition) as info:
        store.transition("job-1", JobState.SUCCEEDED, now=2.0, result={"x": 1}, expect=[JobState.RUNNING])
    assert info.value.current is JobState.QUEUED
    job = store.get_job("job-1")
    assert job.state is JobState.QUEUED
    assert job.result is None
    assert job.last_sequence == 1
    assert len(store.events_after("job-1", 0)) == 1


def test_success_stores_result_and_ends_on_its_state_change(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    store.transition("job-1", JobState.RUNNING, now=2.0)
    store.request_cancel("job-1")
    result = {"adapter_path": "jobs/job-1/adapter", "final_loss": 0.5}
    job, event = store.transition(
        "job-1", JobState.SUCCEEDED, now=9.0, message="done", result=result, expect=[JobState.RUNNING]
    )
    assert job.state is JobState.SUCCEEDED
    assert (job.start_time, job.end_time) == (2.0, 9.0)
    assert job.result == result
    assert not job.cancel_requested  # cleared once final

    events = store.events_after("job-1", 0)
    assert [e.kind for e in events[-2:]] == [EventKind.RESULT, EventKind.STATE_CHANGE]
    assert events[-2].payload == result
    assert events[-1] == event
    assert event.sequence == job.last_sequence == 4


def test_failure_stores_error_in_job_and_event(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    store.transition("job-1", JobState.RUNNING, now=2.0)
    error = {"reason": "OUT_OF_MEMORY", "message": "CUDA out of memory", "hint": "lower batch_size", "step": 7}
    job, event = store.transition("job-1", JobState.FAILED, now=3.0, message="failed", error=error)
    assert job.error == error
    assert job.end_time == 3.0
    assert event.payload == {"previous": "RUNNING", "current": "FAILED", "message": "failed", "error": error}
    assert store.events_after("job-1", 0)[-1].kind is EventKind.STATE_CHANGE


def test_request_cancel_and_record_attempt(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    assert not store.get_job("job-1").cancel_requested
    assert store.request_cancel("job-1").cancel_requested
    assert store.get_job("job-1").cancel_requested

    store.transition("job-1", JobState.CANCELLED, now=2.0)
    assert not store.request_cancel("job-1").cancel_requested  # nothing left to cancel

    job = store.record_attempt("job-1", resumed=False)
    assert (job.attempts, job.resume_count) == (1, 0)
    job = store.record_attempt("job-1", resumed=True)
    assert (job.attempts, job.resume_count) == (2, 1)
    assert store.get_job("job-1").attempts == 2


def test_queue_queries(store: JobStore) -> None:
    assert store.next_queued() is None
    for i in range(4):
        store.create_job(job_id=f"job-{i}", config=CONFIG, now=10.0 - i)  # newer ids get older timestamps
    assert store.next_queued().id == "job-0"  # type: ignore[union-attr]
    store.transition("job-0", JobState.RUNNING, now=11.0)
    store.transition("job-2", JobState.RUNNING, now=11.0)
    assert store.next_queued().id == "job-1"  # type: ignore[union-attr]
    assert [j.id for j in store.jobs_in_state(JobState.QUEUED)] == ["job-1", "job-3"]
    assert [j.id for j in store.jobs_in_state(JobState.RUNNING)] == ["job-0", "job-2"]
    assert store.count_in_state(JobState.RUNNING) == 2
    assert store.count_in_state(JobState.FAILED) == 0
    # A job put back in the queue keeps its original place ahead of later ones.
    store.transition("job-0", JobState.QUEUED, now=12.0)
    assert store.next_queued().id == "job-0"  # type: ignore[union-attr]


# -- datasets -------------------------------------------------------------------------------------------------------


def _dataset(sha: str, filename: str = "data.jsonl") -> DatasetRecord:
    return DatasetRecord(
        id="ds-" + sha[:16],
        filename=filename,
        size_bytes=1234,
        sha256=sha,
        path=f"datasets/{sha}.jsonl",
        report={"num_examples": 10, "num_valid": 9, "format_counts": {"alpaca": 9}},
        create_time=5.0,
    )


def test_datasets_are_idempotent_on_sha256(store: JobStore) -> None:
    sha = "ab" * 32
    stored, created = store.put_dataset(_dataset(sha))
    assert created
    assert store.get_dataset(stored.id) == stored
    assert store.find_dataset_by_sha256(sha) == stored

    again, created_again = store.put_dataset(_dataset(sha, filename="renamed.jsonl"))
    assert not created_again
    assert again == stored
    assert again.filename == "data.jsonl"

    other, created_other = store.put_dataset(_dataset("cd" * 32))
    assert created_other
    assert store.get_dataset(other.id).sha256 == "cd" * 32


# -- durability -----------------------------------------------------------------------------------------------------


def test_reopen_after_close_keeps_everything(open_store: StoreFactory) -> None:
    s = open_store()
    s.create_job(job_id="job-1", config=CONFIG, request_id="req", owner="o", now=1.0)
    s.transition("job-1", JobState.RUNNING, now=2.0)
    s.append_event("job-1", EventKind.PROGRESS, {"step": 1}, now=3.0)
    s.record_attempt("job-1", resumed=True)
    s.transition("job-1", JobState.SUCCEEDED, now=4.0, result={"ok": True})
    s.put_dataset(_dataset("ef" * 32))
    job_before = s.get_job("job-1")
    events_before = s.events_after("job-1", 0)
    s.close()

    s = open_store()
    assert s.get_job("job-1") == job_before
    assert s.events_after("job-1", 0) == events_before
    assert s.find_by_request_id("req", "o") == job_before
    assert s.find_dataset_by_sha256("ef" * 32) is not None
    assert s.integrity_check() == "ok"
    assert s.append_event("job-1", EventKind.LOG, {"level": "INFO", "message": "x"}, now=5.0).sequence == 6


_CHILD = """
import os, sys
from pathlib import Path
from finetune_server.storage.records import EventKind
from finetune_server.storage.job_store import SqliteJobStore

store = SqliteJobStore(Path(sys.argv[1]))
acks = os.fdopen(int(sys.argv[2]), "w", buffering=1)
job, _ = store.create_job(job_id="job-crash", config={"k": 1}, request_id="crash", now=1.0)
acks.write(f"{job.last_sequence}\\n")
i = 0
while True:
    i += 1
    event = store.append_event("job-crash", EventKind.LOG, {"level": "INFO", "message": f"line {i}"}, now=float(i))
    acks.write(f"{event.sequence}\\n")
"""


def test_sqlite_everything_acknowledged_survives_sigkill(db_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db_path), str(write_fd)],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
    )
    os.close(write_fd)
    acked = 0
    try:
        with os.fdopen(read_fd) as acks:
            for line in acks:
                acked = int(line)
                if acked >= 40:
                    # Killed while it keeps writing: the next transaction may be half done.
                    os.kill(proc.pid, signal.SIGKILL)
                    break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert acked >= 40

    with SqliteJobStore(db_path) as s:
        assert s.integrity_check() == "ok"
        job = s.get_job("job-crash")
        assert job.request_id == "crash"
        assert job.last_sequence >= acked
        events = s.events_after("job-crash", 0)
        assert [e.sequence for e in events] == list(range(1, job.last_sequence + 1))
        assert events[0].kind is EventKind.STATE_CHANGE
        assert [e.payload["message"] for e in events[1:]] == [f"line {i}" for i in range(1, job.last_sequence)]


# -- migrations -----------------------------------------------------------------------------------------------------


def _indexes(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    finally:
        conn.close()


def test_sqlite_v1_database_is_migrated_and_reopening_is_idempotent(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    assert apply_migrations(conn, MIGRATIONS[:1]) == 0
    conn.execute(
        "INSERT INTO jobs (id, state, config, create_time, queue_position, last_sequence)"
        " VALUES ('job-old', 'QUEUED', '{}', 1.0, 1, 0)"
    )
    conn.close()
    assert _pragma(db_path, "user_version") == 1
    assert "jobs_newest" not in _indexes(db_path)

    with SqliteJobStore(db_path) as s:
        assert s.get_job("job-old").state is JobState.QUEUED
    assert _pragma(db_path, "user_version") == SCHEMA_VERSION == 7
    assert {"jobs_newest", "jobs_owner_newest", "jobs_state_queue", "jobs_request_id"} <= _indexes(db_path)

    # Reopening re-runs nothing (migration 2's CREATE INDEX would fail if it did).
    with SqliteJobStore(db_path) as s:
        assert s.next_queued().id == "job-old"  # type: ignore[union-attr]
    assert _pragma(db_path, "user_version") == SCHEMA_VERSION


def test_sqlite_failed_migration_rolls_back_entirely(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    apply_migrations(conn, MIGRATIONS[:1])
    broken = (*MIGRATIONS[:1], ("CREATE TABLE extra (x INTEGER)", "THIS IS NOT SQL"))
    with pytest.raises(sqlite3.OperationalError):
        apply_migrations(conn, broken)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None
    conn.close()


def test_newer_schema_is_refused(open_store: StoreFactory, request: pytest.FixtureRequest, db_path: Path) -> None:
    open_store().close()
    if "postgres" in request.node.callspec.id:
        postgres_cluster = request.getfixturevalue("postgres_cluster")
        database = request.getfixturevalue("postgres_url").rsplit("/", 1)[1]
        postgres_cluster.sql("UPDATE finetune_schema SET version = 99", database)
    else:
        conn = sqlite3.connect(db_path)
        conn.execute("PRAGMA user_version = 99")
        conn.close()
    with pytest.raises(SchemaTooNewError, match="99"):
        open_store()


def test_integrity_check_is_ok(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    assert store.integrity_check() == "ok"


def test_artifacts_round_trip_and_replace(store: JobStore) -> None:
    store.create_job(job_id="job-a", config={}, now=1.0)
    record = ArtifactRecord(
        id="art-1", job_id="job-a", format="ADAPTER", step=6, base_model="m", path="artifacts/art-1",
        files=[{"path": "adapter_config.json", "size_bytes": 10, "sha256": "ab"}], total_size_bytes=10,
        vllm={"compatible": True, "problems": [], "serve_command": "vllm serve m"}, create_time=2.0, owner="alice",
    )  # fmt: skip
    store.put_artifact(record)
    assert store.get_artifact("art-1") == record
    store.put_artifact(dataclasses.replace(record, total_size_bytes=11))
    assert store.get_artifact("art-1").total_size_bytes == 11
    with pytest.raises(KeyError):
        store.get_artifact("art-missing")


def _artifact_record(n: int, job_id: str, owner: str = "") -> ArtifactRecord:
    return ArtifactRecord(
        id=f"art-{n}", job_id=job_id, format="ADAPTER", step=n, base_model="m", path=f"artifacts/art-{n}",
        files=[], total_size_bytes=n, vllm={}, create_time=float(n), owner=owner,
    )  # fmt: skip


def test_labels_are_kept_and_every_one_asked_for_must_match(store: JobStore) -> None:
    store.create_job(job_id="job-a", config=CONFIG, labels={"team": "nlp", "run": "1"}, owner="alice", now=1.0)
    store.create_job(job_id="job-b", config=CONFIG, labels={"team": "nlp", "run": "2"}, owner="bob", now=2.0)
    store.create_job(job_id="job-c", config=CONFIG, now=3.0)
    assert store.get_job("job-a").labels == {"team": "nlp", "run": "1"}
    assert store.get_job("job-c").labels == {}

    def listed(**kwargs: object) -> list[str]:
        page, _ = store.list_jobs(states=None, page_size=10, page_token="", **kwargs)  # type: ignore[arg-type]
        return [j.id for j in page]

    assert listed(labels={"team": "nlp"}) == ["job-b", "job-a"]
    assert listed(labels={"team": "nlp", "run": "1"}) == ["job-a"]
    assert listed(labels={"team": "nlp", "run": "3"}) == []
    assert listed(labels={"team": "nlp"}, owner="bob") == ["job-b"]
    assert listed(labels={}) == ["job-c", "job-b", "job-a"]
    first, token = store.list_jobs(states=None, page_size=1, page_token="", labels={"team": "nlp"})
    second, last = store.list_jobs(states=None, page_size=1, page_token=token, labels={"team": "nlp"})
    assert ([j.id for j in first], [j.id for j in second], last) == (["job-b"], ["job-a"], "")


def test_deleting_an_ended_job_takes_its_events_and_labels_and_leaves_its_artifacts(store: JobStore) -> None:
    store.create_job(job_id="job-a", config=CONFIG, labels={"team": "nlp"}, owner="alice", now=1.0)
    store.create_job(job_id="job-b", config=CONFIG, owner="alice", now=2.0)
    store.transition("job-a", JobState.RUNNING, now=3.0)
    with pytest.raises(InvalidTransition) as running:
        store.delete_job("job-a")
    assert running.value.current is JobState.RUNNING and store.get_job("job-a").state is JobState.RUNNING
    store.transition("job-a", JobState.SUCCEEDED, now=4.0, result={"steps": 1})
    store.put_artifact(_artifact_record(1, "job-a", owner="alice"))

    deleted = store.delete_job("job-a")
    assert deleted.id == "job-a" and deleted.state is JobState.SUCCEEDED and deleted.labels == {"team": "nlp"}
    for read in (store.get_job, lambda job_id: store.events_after(job_id, 0), store.delete_job):
        with pytest.raises(KeyError):
            read("job-a")
    assert store.list_jobs(states=None, page_size=10, page_token="", labels={"team": "nlp"})[0] == []
    assert store.get_artifact("art-1").owner == "alice", "the artifact outlives its job"
    assert [a.id for a in store.list_artifacts(page_size=10, page_token="", job_id="job-a")[0]] == ["art-1"]
    assert store.integrity_check() == "ok"
    # A new job may carry the deleted one's labels again (the label rows went with it).
    store.create_job(job_id="job-c", config=CONFIG, labels={"team": "nlp"}, now=5.0)
    assert store.get_job("job-b").state is JobState.QUEUED


def test_artifacts_are_per_owner_paged_newest_first_by_job_and_deleted(store: JobStore) -> None:
    store.create_job(job_id="job-a", config=CONFIG, owner="alice", now=1.0)
    store.create_job(job_id="job-b", config=CONFIG, owner="bob", now=1.0)
    for n in range(1, 6):
        store.put_artifact(_artifact_record(n, "job-a", owner="alice"))
    store.put_artifact(_artifact_record(9, "job-b", owner="bob"))
    pages, token = [], ""
    while True:
        page, token = store.list_artifacts(page_size=2, page_token=token, owner="alice")
        pages.append([a.id for a in page])
        if not token:
            break
    assert pages == [["art-5", "art-4"], ["art-3", "art-2"], ["art-1"]]
    assert [a.id for a in store.list_artifacts(page_size=10, page_token="", owner="bob")[0]] == ["art-9"]
    assert len(store.list_artifacts(page_size=10, page_token="", owner=None)[0]) == 6
    assert [a.id for a in store.list_artifacts(page_size=10, page_token="", job_id="job-b")[0]] == ["art-9"]
    with pytest.raises(ValueError, match="page_token"):
        store.list_artifacts(page_size=10, page_token="not base64 !!")

    assert store.delete_artifact("art-9") == _artifact_record(9, "job-b", owner="bob")
    for call in (store.get_artifact, store.delete_artifact):
        with pytest.raises(KeyError):
            call("art-9")
    assert store.get_job("job-b").owner == "bob", "deleting an artifact leaves its job"


def test_sqlite_a_schema_6_database_keeps_its_artifacts_with_their_jobs_owner(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    apply_migrations(conn, MIGRATIONS[:6])
    conn.execute(
        "INSERT INTO jobs (id, state, config, owner, create_time, queue_position)"
        " VALUES ('job-old', 'SUCCEEDED', '{}', 'alice', 1.0, 1)"
    )
    conn.execute(
        "INSERT INTO artifacts (id, job_id, format, step, base_model, path, files, total_size_bytes, vllm,"
        " create_time) VALUES ('art-old', 'job-old', 'ADAPTER', 6, 'm', 'artifacts/art-old', '[]', 3, '{}', 2.0)"
    )
    conn.close()
    with SqliteJobStore(path) as store:
        assert store.get_job("job-old").labels == {}
        assert store.get_artifact("art-old").owner == "alice"
        store.delete_job("job-old")
        assert store.get_artifact("art-old").job_id == "job-old", "no cascade from jobs any more"
    assert {"artifacts_owner_newest", "artifacts_job", "job_labels_key_value"} <= _indexes(path)


def test_postgres_a_migration_1_database_keeps_its_artifacts_with_their_jobs_owner(postgres_url: str) -> None:
    import psycopg

    from finetune_server.storage import postgres_store

    with psycopg.connect(postgres_url) as conn:
        postgres_store.apply_migrations(conn, postgres_store.MIGRATIONS[:1])
        conn.execute(
            "INSERT INTO jobs (id, state, config, owner, create_time, queue_position)"
            " VALUES ('job-old', 'SUCCEEDED', '{}', 'alice', 1.0, 1)"
        )
        conn.execute(
            "INSERT INTO artifacts (id, job_id, format, step, base_model, path, files, total_size_bytes, vllm,"
            " create_time) VALUES ('art-old', 'job-old', 'ADAPTER', 6, 'm', 'artifacts/art-old', '[]', 3, '{}', 2.0)"
        )
        conn.commit()
    with PostgresJobStore(postgres_url) as store:
        assert store.get_job("job-old").labels == {}
        assert store.get_artifact("art-old").owner == "alice"
        store.delete_job("job-old")
        assert store.get_artifact("art-old").job_id == "job-old", "no cascade from jobs any more"
    with psycopg.connect(postgres_url) as conn:
        assert postgres_store.apply_migrations(conn) == postgres_store.SCHEMA_VERSION == 2, "applied once"


def test_sqlite_schema_3_database_is_upgraded_and_keeps_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    apply_migrations(conn, MIGRATIONS[:3])
    conn.execute(
        "INSERT INTO jobs (id, state, config, request_id, owner, create_time, queue_position)"
        " VALUES ('job-old', 'QUEUED', '{}', 'old-key', 'alice', 1.0, 1)"
    )
    conn.close()
    with SqliteJobStore(path) as store:
        assert store.find_by_request_id("old-key", "alice").id == "job-old"  # type: ignore[union-attr]
        assert store.find_by_request_id("old-key", "bob") is None
        created, fresh = store.create_job(job_id="job-bob", config={}, request_id="old-key", owner="bob", now=2.0)
        assert fresh and created.owner == "bob"


def test_request_ids_are_scoped_to_their_owner_and_keys_record_what_they_made(store: JobStore) -> None:
    alices, _ = store.create_job(job_id="job-a", config=CONFIG, request_id="k", owner="alice", now=1.0)
    bobs, created = store.create_job(job_id="job-b", config=CONFIG, request_id="k", owner="bob", now=2.0)
    assert created and bobs.id == "job-b" and store.find_by_request_id("k", "alice") == alices
    claim = {"owner": "alice", "method": "Export", "request_id": "k", "now": 3.0}
    assert store.claim_request_key(**claim, fingerprint="f1", resource_id="art-1") == ("art-1", "f1")
    assert store.claim_request_key(**claim, fingerprint="f2", resource_id="art-2") == ("art-1", "f1")
    other = {**claim, "owner": "bob"}
    assert store.claim_request_key(**other, fingerprint="f2", resource_id="art-2") == ("art-2", "f2")


def _dataset_record(n: int, owner: str = "", sha: str = "") -> DatasetRecord:
    digest = sha or f"{n:064x}"
    return DatasetRecord(
        id=f"ds-{owner}{n}", filename=f"d{n}.jsonl", size_bytes=n, sha256=digest, path=f"datasets/d{n}.jsonl",
        report={"num_valid": n}, create_time=float(n), owner=owner,
    )  # fmt: skip


def test_datasets_are_per_owner_paged_newest_first_and_deleted(store: JobStore) -> None:
    for n in range(1, 6):
        store.put_dataset(_dataset_record(n, owner="alice"))
    shared = "f" * 64
    alices, _ = store.put_dataset(_dataset_record(10, owner="alice", sha=shared))
    bobs, created = store.put_dataset(_dataset_record(11, owner="bob", sha=shared))
    assert created and bobs.id != alices.id, "the same content is one dataset per owner"
    assert store.put_dataset(_dataset_record(12, owner="bob", sha=shared)) == (bobs, False)
    assert store.find_dataset_by_sha256(shared, "bob") == bobs and store.find_dataset_by_sha256(shared) is None

    pages, token = [], ""
    while True:
        page, token = store.list_datasets(page_size=2, page_token=token, owner="alice")
        pages.append([d.id for d in page])
        if not token:
            break
    assert pages == [["ds-alice10", "ds-alice5"], ["ds-alice4", "ds-alice3"], ["ds-alice2", "ds-alice1"]]
    assert {d.id for d in store.list_datasets(page_size=100, page_token="", owner=None)[0]} >= {bobs.id, alices.id}

    assert store.delete_dataset(bobs.id) == bobs
    with pytest.raises(KeyError):
        store.get_dataset(bobs.id)
    with pytest.raises(KeyError):
        store.delete_dataset(bobs.id)
    assert store.get_dataset(alices.id) == alices


def test_sqlite_a_schema_4_database_keeps_its_datasets_without_an_owner(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    apply_migrations(conn, MIGRATIONS[:4])
    conn.execute(
        "INSERT INTO datasets (id, filename, size_bytes, sha256, path, report, create_time)"
        " VALUES ('ds-old', 'old.jsonl', 3, 'abc', 'datasets/ds-old.jsonl', '{}', 1.0)"
    )
    conn.close()
    with SqliteJobStore(path) as store:
        old = store.get_dataset("ds-old")
        assert (old.owner, old.sha256, old.filename) == ("", "abc", "old.jsonl")
        assert store.find_dataset_by_sha256("abc") == old


# -- claims and leases ----------------------------------------------------------------------------------------------


def test_concurrent_openers_migrate_once(open_store: StoreFactory) -> None:
    # A fresh database opened by 4 servers at once: one migrates, the others find it done (a second CREATE TABLE
    # would fail their start).
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []
    stores: list[JobStore] = []

    def start() -> None:
        try:
            barrier.wait()
            stores.append(open_store())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(stores) == 4
    stores[0].create_job(job_id="job-1", config=CONFIG, now=1.0)
    assert all(s.get_job("job-1").queue_position == 1 for s in stores)


def test_fifty_jobs_claimed_by_four_schedulers_each_exactly_once(open_store: StoreFactory) -> None:
    first = open_store()
    for i in range(50):
        first.create_job(job_id=f"job-{i:02d}", config=CONFIG, now=float(i))
    schedulers = [open_store() for _ in range(4)]
    barrier = threading.Barrier(4)
    claimed: dict[str, list[str]] = {f"server-{n}": [] for n in range(4)}
    errors: list[BaseException] = []

    def schedule(n: int) -> None:
        try:
            barrier.wait()
            while (job := schedulers[n].claim_next(f"server-{n}", 30, now=100.0)) is not None:
                claimed[f"server-{n}"].append(job.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=schedule, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    every = [job_id for ids in claimed.values() for job_id in ids]
    assert sorted(every) == [f"job-{i:02d}" for i in range(50)]  # each exactly once
    for server, ids in claimed.items():
        assert ids == sorted(ids), "each scheduler takes the queue in order"
        for job_id in ids:
            job = first.get_job(job_id)
            assert (job.state, job.lease_owner, job.lease_epoch) == (JobState.RUNNING, server, 1)
            assert [e.sequence for e in first.events_after(job_id, 0)] == [1, 2]
    assert first.count_in_state(JobState.QUEUED) == 0


def test_a_claim_takes_the_queue_head_under_a_lease_by_the_database_clock(store: JobStore) -> None:
    assert store.claim_next("server-a", 30, now=1.0) is None
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    store.create_job(job_id="job-2", config=CONFIG, now=2.0)
    before = time.time()
    job = store.claim_next("server-a", 30, now=3.0, message="a worker is starting on slot 0")
    after = time.time()
    assert job is not None and job.id == "job-1"
    assert job.state is JobState.RUNNING and job.start_time == 3.0
    assert job.lease == Lease("server-a", 1)
    assert job.lease_expires is not None and before + 29 < job.lease_expires < after + 31
    [_, event] = store.events_after("job-1", 0)
    assert event.payload == {"previous": "QUEUED", "current": "RUNNING", "message": "a worker is starting on slot 0"}

    renewed = store.renew_lease("job-1", job.lease, 60)
    assert renewed.lease_expires is not None and renewed.lease_expires > job.lease_expires + 25
    assert renewed.lease == job.lease


def test_fenced_writes_of_a_lost_lease_write_nothing(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    first = store.claim_next("server-a", 0, now=2.0)  # expires at once
    assert first is not None and first.lease is not None
    lease = first.lease
    store.append_event("job-1", EventKind.LOG, {"level": "INFO", "message": "a's line"}, now=3.0, lease=lease)
    [requeued] = store.requeue_expired(now=4.0, message="the lease expired")
    assert requeued.id == "job-1" and requeued.state is JobState.QUEUED and requeued.lease is None
    assert requeued.queue_position == first.queue_position

    second = store.claim_next("server-b", 30, now=5.0)
    assert second is not None and second.lease == Lease("server-b", 2)
    before = store.get_job("job-1").last_sequence
    with pytest.raises(LeaseLost):
        store.append_event("job-1", EventKind.LOG, {"level": "INFO", "message": "late"}, now=6.0, lease=lease)
    with pytest.raises(LeaseLost):
        store.append_event("job-1", EventKind.PROGRESS, {"step": 99}, now=6.0, lease=lease)
    with pytest.raises(LeaseLost):
        store.transition("job-1", JobState.SUCCEEDED, now=6.0, result={"steps": 1}, lease=lease)
    with pytest.raises(LeaseLost):
        store.renew_lease("job-1", lease, 30)
    job = store.get_job("job-1")
    assert (job.state, job.last_sequence, job.progress, job.result) == (JobState.RUNNING, before, None, None)

    # The current lease writes on, and the re-run's events continue the sequence.
    event = store.append_event("job-1", EventKind.LOG, {"level": "INFO", "message": "b"}, now=7.0, lease=second.lease)
    assert event.sequence == before + 1
    done, _ = store.transition("job-1", JobState.SUCCEEDED, now=8.0, result={"steps": 1}, lease=second.lease)
    assert done.lease is None and done.lease_owner == ""
    states = [e.payload["current"] for e in store.events_after("job-1", 0) if e.kind is EventKind.STATE_CHANGE]
    assert states == ["QUEUED", "RUNNING", "QUEUED", "RUNNING", "SUCCEEDED"]
    requeue_event = store.events_after("job-1", 0)[3]
    assert requeue_event.payload["message"] == "the lease expired"
    assert [e.sequence for e in store.events_after("job-1", 0)] == list(range(1, done.last_sequence + 1))


def test_live_leases_are_not_requeued_unless_asked_for_everything(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    store.create_job(job_id="job-2", config=CONFIG, now=2.0)
    store.claim_next("server-a", 300, now=3.0)
    store.transition("job-2", JobState.RUNNING, now=3.0)  # RUNNING without a lease: an older server's job
    assert [j.id for j in store.requeue_expired(now=4.0, message="expired")] == ["job-2"]
    assert store.get_job("job-1").state is JobState.RUNNING
    assert [j.id for j in store.requeue_expired(now=5.0, message="restarted", everything=True)] == ["job-1"]
    assert store.count_in_state(JobState.QUEUED) == 2


def test_a_released_lease_puts_the_job_back_at_its_place(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    store.create_job(job_id="job-2", config=CONFIG, now=2.0)
    job = store.claim_next("server-a", 30, now=3.0)
    assert job is not None and job.lease is not None
    released = store.release_lease("job-1", job.lease, now=4.0, message="the server is stopping")
    assert (released.state, released.lease) == (JobState.QUEUED, None)
    with pytest.raises(LeaseLost):
        store.release_lease("job-1", job.lease, now=5.0, message="again")
    again = store.claim_next("server-b", 30, now=6.0)
    assert again is not None and again.id == "job-1" and again.lease == Lease("server-b", 2)
    assert again.start_time == 3.0


def test_the_data_dir_binding_is_recorded_once(store: JobStore) -> None:
    assert store.bind_data_dir("dir-1") == "dir-1"
    assert store.bind_data_dir("dir-2") == "dir-1"


def test_nan_and_infinity_round_trip_in_every_payload(store: JobStore) -> None:
    store.create_job(job_id="job-1", config=CONFIG, now=1.0)
    odd = {"loss": float("nan"), "grad_norm": float("inf"), "lr": float("-inf"), "nested": [float("nan")]}
    store.append_event("job-1", EventKind.PROGRESS, odd, now=2.0)
    store.transition("job-1", JobState.RUNNING, now=3.0)
    store.transition("job-1", JobState.SUCCEEDED, now=4.0, result={"final_loss": float("nan")})
    job = store.get_job("job-1")
    assert job.progress is not None and math.isnan(job.progress["loss"]) and math.isnan(job.progress["nested"][0])
    assert (job.progress["grad_norm"], job.progress["lr"]) == (math.inf, -math.inf)
    assert job.result is not None and math.isnan(job.result["final_loss"])
    stored = store.events_after("job-1", 1, limit=1)[0].payload
    assert math.isnan(stored["loss"]) and stored["grad_norm"] == math.inf


def test_a_store_lock_is_held_across_servers_until_released(open_store: StoreFactory) -> None:
    mine, other = open_store(), open_store()
    held = mine.try_lock("export:art-1")
    assert held is not None and mine.reachable()
    if mine.shared:  # another server of the same database: refused while held, its own names still free
        assert other.try_lock("export:art-1") is None
        free = other.try_lock("export:art-2")
        assert free is not None
        free.release()
    held.release()
    again = other.try_lock("export:art-1")
    assert again is not None
    again.release()
