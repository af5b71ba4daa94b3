"""The job service's persistent state: jobs, their numbered events, uploaded datasets and artifacts.

`JobStore` is the seam the scheduler, event fan-out and servicers talk to. `SqlJobStore` holds the SQL both stores
share (written once, with `?` placeholders); `SqliteJobStore` is the embedded default, `PostgresJobStore`
(storage/postgres_store.py) lets several servers share one queue.

Durability first: every method is one committed transaction, so whatever a method returned survives a `kill -9` of
the server. SQLite runs in WAL mode with `synchronous=FULL`; one connection guarded by a lock serves the asyncio
thread and worker threads alike; writes use `BEGIN IMMEDIATE` so that several processes on the same file (tests, a
CLI beside the server) serialise cleanly instead of failing on lock upgrades.

Leases: a server claims a queued job (`claim_next`), which makes it RUNNING under a lease (owner, epoch, expiry by the
database's clock). The attempt's events and transitions carry that lease; a write whose lease is no longer the
job's (it expired and the job was re-queued, claimed again...) matches no row and raises `LeaseLost`. Per-job
sequences come from a counter on the job row, bumped in the append's own transaction, so they stay gap-free
whichever server or thread writes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Protocol

import structlog

from finetune_server.storage.records import (
    FINAL_STATES,
    ArtifactRecord,
    DatasetRecord,
    EventKind,
    JobEventRecord,
    JobRecord,
    JobState,
    Lease,
)

log = structlog.get_logger(__name__)

BUSY_TIMEOUT_MS = 10_000

# What a store tells listeners (`JobStore.listen`), as (kind, job id): a hint to re-read the tables, never the data.
NOTICE_QUEUED = "queued"  # a job entered the queue
NOTICE_EVENT = "event"  # a job has a new event
NOTICE_CANCEL = "cancel"  # a job's cancellation was requested
NOTICE_RESYNC = "resync"  # notices may have been missed (the listener reconnected): re-read everything
OnNotice = Callable[[str, str], None]


class InvalidTransition(Exception):  # noqa: N818 - the name other modules catch
    """A state change was asked for a job whose current state is not one the caller expected."""

    def __init__(self, current: JobState, job_id: str = "") -> None:
        super().__init__(f"job {job_id or '?'} is {current.name}")
        self.current = current
        self.job_id = job_id


class LeaseLost(Exception):  # noqa: N818 - the name other modules catch
    """A write carried a lease the job no longer has: another attempt owns it now; this one must stop writing."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"the lease on job {job_id} is no longer this attempt's")
        self.job_id = job_id


class StoreRefusedError(RuntimeError):
    """The server cannot start on this store: the message is one line meant for the operator."""


class SchemaTooNewError(StoreRefusedError):
    """The database was written by a newer version of the server; opening it could corrupt it."""


class StoreUnavailableError(StoreRefusedError):
    """The database cannot be reached."""


class StoreLock(Protocol):
    def release(self) -> None: ...


class _LocalLock:
    """A store one server owns needs no lock between servers: that server's own locks suffice."""

    def release(self) -> None:
        pass


class JobStore(Protocol):
    """What the job service needs from its storage. Unknown ids raise `KeyError(id)`.

    `shared` says whether other servers may use the same store (then the service relies on leases and notices, and
    never assumes a RUNNING job it does not run is abandoned).
    """

    shared: bool

    def create_job(
        self,
        *,
        job_id: str,
        config: dict[str, Any],
        request_id: str = "",
        request_fingerprint: str = "",
        display_name: str = "",
        owner: str = "",
        labels: Mapping[str, str] | None = None,
        now: float,
    ) -> tuple[JobRecord, bool]: ...

    def get_job(self, job_id: str) -> JobRecord: ...

    def find_by_request_id(self, request_id: str, owner: str = "") -> JobRecord | None: ...

    def claim_request_key(
        self, *, owner: str, method: str, request_id: str, fingerprint: str, resource_id: str, now: float
    ) -> tuple[str, str]: ...

    def list_jobs(
        self,
        *,
        states: Collection[JobState] | None,
        page_size: int,
        page_token: str,
        owner: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> tuple[list[JobRecord], str]: ...

    def delete_job(self, job_id: str) -> JobRecord: ...

    def append_event(
        self, job_id: str, kind: EventKind, payload: dict[str, Any], *, now: float, lease: Lease | None = None
    ) -> JobEventRecord: ...

    def transition(
        self,
        job_id: str,
        new_state: JobState,
        *,
        now: float,
        message: str = "",
        error: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        expect: Collection[JobState] | None = None,
        lease: Lease | None = None,
    ) -> tuple[JobRecord, JobEventRecord]: ...

    def events_after(self, job_id: str, after_sequence: int, limit: int = 1000) -> list[JobEventRecord]: ...

    def request_cancel(self, job_id: str) -> JobRecord: ...

    def record_attempt(self, job_id: str, *, resumed: bool) -> JobRecord: ...

    def record_resume(self, job_id: str) -> JobRecord: ...

    def next_queued(self) -> JobRecord | None: ...

    def claim_next(
        self, server_id: str, lease_seconds: float, *, now: float, message: str = ""
    ) -> JobRecord | None: ...

    def renew_lease(self, job_id: str, lease: Lease, lease_seconds: float) -> JobRecord: ...

    def release_lease(self, job_id: str, lease: Lease, *, now: float, message: str) -> JobRecord: ...

    def requeue_expired(self, *, now: float, message: str, everything: bool = False) -> list[JobRecord]: ...

    def jobs_in_state(self, state: JobState) -> list[JobRecord]: ...

    def count_in_state(self, state: JobState) -> int: ...

    def put_dataset(self, record: DatasetRecord) -> tuple[DatasetRecord, bool]: ...

    def get_dataset(self, dataset_id: str) -> DatasetRecord: ...

    def find_dataset_by_sha256(self, sha256: str, owner: str = "") -> DatasetRecord | None: ...

    def list_datasets(
        self, *, page_size: int, page_token: str, owner: str | None = None
    ) -> tuple[list[DatasetRecord], str]: ...

    def delete_dataset(self, dataset_id: str) -> DatasetRecord: ...

    def put_artifact(self, record: ArtifactRecord) -> ArtifactRecord: ...

    def get_artifact(self, artifact_id: str) -> ArtifactRecord: ...

    def list_artifacts(
        self, *, page_size: int, page_token: str, owner: str | None = None, job_id: str = ""
    ) -> tuple[list[ArtifactRecord], str]: ...

    def delete_artifact(self, artifact_id: str) -> ArtifactRecord: ...

    def bind_data_dir(self, data_dir_id: str) -> str: ...

    def listen(self, on_notice: OnNotice) -> Callable[[], None]: ...

    def integrity_check(self) -> str: ...

    def reachable(self) -> bool:
        """Whether a statement can run now (the health probe asks: a shared database may be lost and come back)."""
        ...

    def try_lock(self, name: str) -> StoreLock | None:
        """A lock named `name` held across every server of this store until released, or None when another server
        holds it now. For work that must run once per data dir (one export of an artifact)."""
        ...

    def close(self) -> None: ...


# Migration N (1-based) brings a database from user_version N-1 to N. Append only; never edit a released step.
# Statements run one by one inside the opening transaction (executescript would commit half-way).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            config TEXT NOT NULL,
            request_id TEXT NOT NULL DEFAULT '',
            display_name TEXT NOT NULL DEFAULT '',
            owner TEXT NOT NULL DEFAULT '',
            create_time REAL NOT NULL,
            start_time REAL,
            end_time REAL,
            progress TEXT,
            error TEXT,
            result TEXT,
            resume_count INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_sequence INTEGER NOT NULL DEFAULT 0,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            queue_position INTEGER NOT NULL
        )""",
        "CREATE UNIQUE INDEX jobs_request_id ON jobs (request_id) WHERE request_id != ''",
        """CREATE TABLE job_events (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            sequence INTEGER NOT NULL,
            time REAL NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            PRIMARY KEY (job_id, sequence)
        ) WITHOUT ROWID""",
        """CREATE TABLE datasets (
            id TEXT PRIMARY KEY,
            filename TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            sha256 TEXT NOT NULL UNIQUE,
            path TEXT NOT NULL,
            report TEXT NOT NULL,
            create_time REAL NOT NULL
        )""",
    ),
    (
        # Listing newest first (optionally per owner) and picking the queue head without scanning every job.
        "CREATE INDEX jobs_newest ON jobs (create_time DESC, id DESC)",
        "CREATE INDEX jobs_owner_newest ON jobs (owner, create_time DESC, id DESC)",
        "CREATE INDEX jobs_state_queue ON jobs (state, queue_position)",
    ),
    (
        """CREATE TABLE artifacts (
            id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            format TEXT NOT NULL,
            step INTEGER NOT NULL,
            base_model TEXT NOT NULL,
            path TEXT NOT NULL,
            files TEXT NOT NULL,
            total_size_bytes INTEGER NOT NULL,
            vllm TEXT NOT NULL,
            create_time REAL NOT NULL
        )""",
    ),
    (
        # Idempotency keys belong to their owner (AIP-155): one token's request_id never finds another's job. The
        # fingerprint of the request a key first came with tells a retry (same request) from a reuse (different).
        "DROP INDEX jobs_request_id",
        "CREATE UNIQUE INDEX jobs_request_id ON jobs (owner, request_id) WHERE request_id != ''",
        "ALTER TABLE jobs ADD COLUMN request_fingerprint TEXT NOT NULL DEFAULT ''",
        # The same for the other methods that take a request_id (Export, UploadDataset): what the key made.
        """CREATE TABLE request_keys (
            owner TEXT NOT NULL,
            method TEXT NOT NULL,
            request_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            resource_id TEXT NOT NULL,
            create_time REAL NOT NULL,
            PRIMARY KEY (owner, method, request_id)
        ) WITHOUT ROWID""",
    ),
    (
        # Leases: which server runs a RUNNING job's attempt, until when (the database's clock), fenced by an epoch.
        "ALTER TABLE jobs ADD COLUMN lease_owner TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE jobs ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN lease_expires REAL",
        # What the store knows about itself (the data dir it belongs to).
        "CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    (
        # Datasets belong to their uploader: each owner has its own record (and id) for the same content, so one
        # token can neither see nor delete another's. Uploads from before have no owner.
        """CREATE TABLE datasets_owned (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL DEFAULT '',
            filename TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            path TEXT NOT NULL,
            report TEXT NOT NULL,
            create_time REAL NOT NULL,
            UNIQUE (owner, sha256)
        )""",
        "INSERT INTO datasets_owned (id, filename, size_bytes, sha256, path, report, create_time)"
        " SELECT id, filename, size_bytes, sha256, path, report, create_time FROM datasets",
        "DROP TABLE datasets",
        "ALTER TABLE datasets_owned RENAME TO datasets",
        "CREATE INDEX datasets_owner_newest ON datasets (owner, create_time DESC, id DESC)",
        "CREATE INDEX datasets_newest ON datasets (create_time DESC, id DESC)",
    ),
    (
        # Artifacts outlive the job they came from (DeleteJob keeps them unless asked to delete them too): they
        # hold their owner themselves and no longer cascade from jobs. Older ones take their job's owner.
        """CREATE TABLE artifacts_owned (
            id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL,
            owner TEXT NOT NULL DEFAULT '',
            format TEXT NOT NULL,
            step INTEGER NOT NULL,
            base_model TEXT NOT NULL,
            path TEXT NOT NULL,
            files TEXT NOT NULL,
            total_size_bytes INTEGER NOT NULL,
            vllm TEXT NOT NULL,
            create_time REAL NOT NULL
        )""",
        "INSERT INTO artifacts_owned (id, job_id, owner, format, step, base_model, path, files, total_size_bytes,"
        " vllm, create_time) SELECT a.id, a.job_id, COALESCE(j.owner, ''), a.format, a.step, a.base_model, a.path,"
        " a.files, a.total_size_bytes, a.vllm, a.create_time FROM artifacts a LEFT JOIN jobs j ON j.id = a.job_id",
        "DROP TABLE artifacts",
        "ALTER TABLE artifacts_owned RENAME TO artifacts",
        "CREATE INDEX artifacts_owner_newest ON artifacts (owner, create_time DESC, id DESC)",
        "CREATE INDEX artifacts_newest ON artifacts (create_time DESC, id DESC)",
        "CREATE INDEX artifacts_job ON artifacts (job_id)",
        # Labels: on the job row as read back, and one row per label for ListJobs' filter.
        "ALTER TABLE jobs ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'",
        """CREATE TABLE job_labels (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (job_id, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX job_labels_key_value ON job_labels (key, value)",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


def apply_migrations(conn: sqlite3.Connection, migrations: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Bring the database to `len(migrations)` in one transaction; returns the version it was at.

    `conn` must be in autocommit mode (isolation_level=None) so the explicit BEGIN/COMMIT here are the only ones.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > len(migrations):
            raise SchemaTooNewError(
                f"database schema version {found} is newer than this server knows ({len(migrations)}); "
                "upgrade sage-finetune or use another data dir"
            )
        for version in range(found + 1, len(migrations) + 1):
            for statement in migrations[version - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


def _dumps(value: dict[str, Any] | None) -> str | None:
    # NaN/inf are kept (a NAN_LOSS progress report must still be stored); json.loads reads them back. Both stores
    # keep payloads as TEXT: PostgreSQL's JSON types refuse NaN and Infinity.
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _loads(text: str | None) -> dict[str, Any] | None:
    return None if text is None else json.loads(text)


def _job(row: Any) -> JobRecord:
    return JobRecord(
        id=row["id"],
        state=JobState(row["state"]),
        config=json.loads(row["config"]),
        request_id=row["request_id"],
        request_fingerprint=row["request_fingerprint"],
        display_name=row["display_name"],
        owner=row["owner"],
        create_time=row["create_time"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        progress=_loads(row["progress"]),
        error=_loads(row["error"]),
        result=_loads(row["result"]),
        resume_count=row["resume_count"],
        attempts=row["attempts"],
        last_sequence=row["last_sequence"],
        cancel_requested=bool(row["cancel_requested"]),
        queue_position=row["queue_position"],
        lease_owner=row["lease_owner"],
        lease_epoch=row["lease_epoch"],
        lease_expires=row["lease_expires"],
        labels=json.loads(row["labels"]),
    )


def _event(row: Any) -> JobEventRecord:
    return JobEventRecord(
        job_id=row["job_id"],
        sequence=row["sequence"],
        time=row["time"],
        kind=EventKind(row["kind"]),
        payload=json.loads(row["payload"]),
    )


def _dataset(row: Any) -> DatasetRecord:
    return DatasetRecord(
        id=row["id"],
        filename=row["filename"],
        size_bytes=row["size_bytes"],
        sha256=row["sha256"],
        path=row["path"],
        report=json.loads(row["report"]),
        create_time=row["create_time"],
        owner=row["owner"],
    )


def _artifact(row: Any) -> ArtifactRecord:
    return ArtifactRecord(
        id=row["id"],
        job_id=row["job_id"],
        format=row["format"],
        step=row["step"],
        base_model=row["base_model"],
        path=row["path"],
        files=json.loads(row["files"]),
        total_size_bytes=row["total_size_bytes"],
        vllm=json.loads(row["vllm"]),
        create_time=row["create_time"],
        owner=row["owner"],
    )


def _encode_token(create_time: float, job_id: str) -> str:
    raw = json.dumps([create_time, job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        create_time, job_id = json.loads(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ValueError("malformed page_token") from exc
    if (
        not isinstance(create_time, int | float)
        or isinstance(create_time, bool)
        or not math.isfinite(create_time)
        or not isinstance(job_id, str)
    ):
        raise ValueError("malformed page_token")
    return float(create_time), job_id


class Connection(Protocol):
    """What the shared SQL needs of a connection: `execute(sql with ? placeholders, params)` -> a cursor."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...


class SqlJobStore:
    """The JobStore methods in SQL both databases speak; subclasses give the transaction and the dialect's bits."""

    shared: bool = False
    # The database's clock in unix seconds (lease expiries never depend on a server's clock).
    NOW_SQL: ClassVar[str]
    # Appended to a queue read that claims rows: other claimers skip the rows one has locked.
    SKIP_LOCKED: ClassVar[str] = ""
    # Appended to a read whose row is then changed: concurrent changes of that job wait for this one.
    FOR_UPDATE: ClassVar[str] = ""
    NEXT_QUEUE_POSITION: ClassVar[str]
    INTEGRITY_ERRORS: ClassVar[tuple[type[BaseException], ...]]

    @contextmanager
    def _tx(self, *, write: bool = False) -> Iterator[Connection]:
        raise NotImplementedError
        yield

    def _notify(self, conn: Connection, kind: str, job_id: str) -> None:
        """Tell other servers' listeners, when this transaction commits (nothing to tell for a private store)."""

    def listen(self, on_notice: OnNotice) -> Callable[[], None]:
        """Call `on_notice(kind, job_id)` for what other servers write, until the returned function is called."""
        return lambda: None

    # -- jobs ----------------------------------------------------------------------------------------------------

    def _get(self, conn: Connection, job_id: str, *, for_update: bool = False) -> JobRecord:
        row = conn.execute(f"SELECT * FROM jobs WHERE id = ?{self.FOR_UPDATE if for_update else ''}", (job_id,))
        found = row.fetchone()
        if found is None:
            raise KeyError(job_id)
        return _job(found)

    def _append(
        self,
        conn: Connection,
        job_id: str,
        kind: EventKind,
        payload: dict[str, Any],
        now: float,
        lease: Lease | None = None,
    ) -> JobEventRecord:
        """Number the event from the job row's counter, bumped in this transaction (the row lock orders writers)."""
        text = json.dumps(payload, separators=(",", ":"))
        sets = "last_sequence = last_sequence + 1"
        params: list[Any] = [job_id]
        if kind is EventKind.PROGRESS:
            sets += ", progress = ?"
            params.insert(0, text)
        where = "id = ?"
        if lease is not None:
            where += " AND state = ? AND lease_owner = ? AND lease_epoch = ?"
            params.extend((JobState.RUNNING.value, lease.owner, lease.epoch))
        row = conn.execute(f"UPDATE jobs SET {sets} WHERE {where} RETURNING last_sequence", params).fetchone()
        if row is None:
            self._get(conn, job_id)  # KeyError when there is no such job
            raise LeaseLost(job_id)
        sequence = int(row["last_sequence"])
        conn.execute(
            "INSERT INTO job_events (job_id, sequence, time, kind, payload) VALUES (?, ?, ?, ?, ?)",
            (job_id, sequence, now, kind.value, text),
        )
        self._notify(conn, NOTICE_EVENT, job_id)
        return JobEventRecord(job_id=job_id, sequence=sequence, time=now, kind=kind, payload=payload)

    def create_job(
        self,
        *,
        job_id: str,
        config: dict[str, Any],
        request_id: str = "",
        request_fingerprint: str = "",
        display_name: str = "",
        owner: str = "",
        labels: Mapping[str, str] | None = None,
        now: float,
    ) -> tuple[JobRecord, bool]:
        """Insert a QUEUED job at the back of the queue with its first event; the owner's known request_id returns
        its job (the caller compares `request_fingerprint` to tell a retry from a reused key)."""
        labels = dict(labels or {})
        try:
            with self._tx(write=True) as conn:
                conn.execute(
                    "INSERT INTO jobs (id, state, config, request_id, request_fingerprint, display_name, owner,"
                    f" labels, create_time, queue_position) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?,"
                    f" {self.NEXT_QUEUE_POSITION})",
                    (
                        job_id,
                        JobState.QUEUED.value,
                        json.dumps(config),
                        request_id,
                        request_fingerprint,
                        display_name,
                        owner,
                        json.dumps(labels, sort_keys=True),
                        now,
                    ),
                )
                for key, value in labels.items():
                    conn.execute("INSERT INTO job_labels (job_id, key, value) VALUES (?, ?, ?)", (job_id, key, value))
                self._append(
                    conn,
                    job_id,
                    EventKind.STATE_CHANGE,
                    {"previous": None, "current": JobState.QUEUED.name, "message": "queued"},
                    now,
                )
                self._notify(conn, NOTICE_QUEUED, job_id)
                job = self._get(conn, job_id)
        except self.INTEGRITY_ERRORS:
            # The UNIQUE index decides races between callers (threads, processes, servers) with the same request_id.
            existing = self.find_by_request_id(request_id, owner) if request_id else None
            if existing is None:
                raise ValueError(f"job {job_id} already exists") from None
            return existing, False
        log.info("job_created", job_id=job_id, request_id=request_id, queue_position=job.queue_position)
        return job, True

    def get_job(self, job_id: str) -> JobRecord:
        with self._tx() as conn:
            return self._get(conn, job_id)

    def find_by_request_id(self, request_id: str, owner: str = "") -> JobRecord | None:
        """The job `owner` created with this idempotency key (keys are scoped to their owner)."""
        if not request_id:
            return None
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE owner = ? AND request_id = ?", (owner, request_id)).fetchone()
        return None if row is None else _job(row)

    def claim_request_key(
        self, *, owner: str, method: str, request_id: str, fingerprint: str, resource_id: str, now: float
    ) -> tuple[str, str]:
        """Record what `request_id` of `owner` made with `method`, unless known: returns the key's (resource_id,
        fingerprint), the stored ones when the key was claimed before (by this request or another)."""
        with self._tx(write=True) as conn:
            conn.execute(
                "INSERT INTO request_keys (owner, method, request_id, fingerprint, resource_id, create_time)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (owner, method, request_id, fingerprint, resource_id, now),
            )
            row = conn.execute(
                "SELECT resource_id, fingerprint FROM request_keys WHERE owner = ? AND method = ? AND request_id = ?",
                (owner, method, request_id),
            ).fetchone()
        return str(row["resource_id"]), str(row["fingerprint"])

    def list_jobs(
        self,
        *,
        states: Collection[JobState] | None,
        page_size: int,
        page_token: str,
        owner: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> tuple[list[JobRecord], str]:
        """Newest first, keyset-paged on (create_time, id); an empty `states` means no filter, like None; every
        one of `labels` must be a label of the job with that value."""
        where: list[str] = []
        params: list[Any] = []
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params.extend(s.value for s in states)
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        for key, value in sorted((labels or {}).items()):
            where.append("EXISTS (SELECT 1 FROM job_labels l WHERE l.job_id = jobs.id AND l.key = ? AND l.value = ?)")
            params.extend((key, value))
        rows, next_token = self._newest_first("jobs", where, params, page_size, page_token)
        return [_job(r) for r in rows], next_token

    def delete_job(self, job_id: str) -> JobRecord:
        """Remove a job that has ended, with its events and labels (its folder and artifacts are the caller's);
        returns the record as it was. `InvalidTransition` for a job that has not ended."""
        with self._tx(write=True) as conn:
            job = self._get(conn, job_id, for_update=True)
            if not job.state.is_final:
                raise InvalidTransition(job.state, job_id)
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))  # events and labels cascade
        log.info("job_deleted", job_id=job_id)
        return job

    def _newest_first(
        self, table: str, where: list[str], params: list[Any], page_size: int, page_token: str
    ) -> tuple[list[sqlite3.Row], str]:
        """One page of `table`'s rows matching `where`, newest first, keyset-paged on (create_time, id)."""
        if page_size < 1:
            raise ValueError("page_size must be positive")
        if page_token:
            create_time, last_id = _decode_token(page_token)
            where = [*where, "(create_time < ? OR (create_time = ? AND id < ?))"]
            params = [*params, create_time, create_time, last_id]
        sql = f"SELECT * FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY create_time DESC, id DESC LIMIT ?"
        with self._tx() as conn:
            rows = conn.execute(sql, [*params, page_size + 1]).fetchall()
        last = rows[page_size - 1] if len(rows) > page_size else None
        return rows[:page_size], _encode_token(last["create_time"], last["id"]) if last is not None else ""

    def append_event(
        self, job_id: str, kind: EventKind, payload: dict[str, Any], *, now: float, lease: Lease | None = None
    ) -> JobEventRecord:
        """Number the event after the job's newest; a PROGRESS payload also becomes the job's progress. With a
        `lease`, only while the job's attempt still holds it (else `LeaseLost`, nothing written)."""
        with self._tx(write=True) as conn:
            return self._append(conn, job_id, kind, payload, now, lease)

    def _change_state(
        self,
        conn: Connection,
        job: JobRecord,
        new_state: JobState,
        *,
        now: float,
        message: str = "",
        error: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        claim: tuple[str, float] | None = None,
    ) -> JobEventRecord:
        """Set the state and record it; `claim` (server id, lease seconds) takes a new lease; leaving RUNNING ends
        the lease. A result event goes first so a success ends on its state change."""
        sets = ["state = ?"]
        params: list[Any] = [new_state.value]
        if new_state is JobState.RUNNING and job.start_time is None:
            sets.append("start_time = ?")
            params.append(now)
        if new_state.is_final:
            sets.extend(("end_time = ?", "cancel_requested = 0"))
            params.append(now)
        if claim is not None:
            sets.extend(("lease_owner = ?", "lease_epoch = lease_epoch + 1", f"lease_expires = {self.NOW_SQL} + ?"))
            params.extend(claim)
        elif new_state is not JobState.RUNNING:
            sets.extend(("lease_owner = ''", "lease_expires = NULL"))
        if error is not None:
            sets.append("error = ?")
            params.append(_dumps(error))
        if result is not None:
            sets.append("result = ?")
            params.append(_dumps(result))
            self._append(conn, job.id, EventKind.RESULT, result, now)
        conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*params, job.id))
        payload: dict[str, Any] = {"previous": job.state.name, "current": new_state.name, "message": message}
        if error is not None:
            payload["error"] = error
        event = self._append(conn, job.id, EventKind.STATE_CHANGE, payload, now)
        if new_state is JobState.QUEUED:
            self._notify(conn, NOTICE_QUEUED, job.id)
        log.info("job_transition", job_id=job.id, previous=job.state.name, current=new_state.name)
        return event

    def transition(
        self,
        job_id: str,
        new_state: JobState,
        *,
        now: float,
        message: str = "",
        error: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        expect: Collection[JobState] | None = None,
        lease: Lease | None = None,
    ) -> tuple[JobRecord, JobEventRecord]:
        """Compare-and-set the state and record it. With a `lease`, only while the job's attempt holds it."""
        with self._tx(write=True) as conn:
            job = self._get(conn, job_id, for_update=True)
            if lease is not None and job.lease != lease:
                raise LeaseLost(job_id)
            if expect is not None and job.state not in expect:
                raise InvalidTransition(job.state, job_id)
            event = self._change_state(conn, job, new_state, now=now, message=message, error=error, result=result)
            return self._get(conn, job_id), event

    def events_after(self, job_id: str, after_sequence: int, limit: int = 1000) -> list[JobEventRecord]:
        with self._tx() as conn:
            if conn.execute("SELECT 1 AS found FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise KeyError(job_id)
            rows = conn.execute(
                "SELECT * FROM job_events WHERE job_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
                (job_id, after_sequence, limit),
            ).fetchall()
        return [_event(r) for r in rows]

    def request_cancel(self, job_id: str) -> JobRecord:
        """Flag a job for cancellation; a job already in a final state is returned unchanged."""
        finals = tuple(s.value for s in FINAL_STATES)
        with self._tx(write=True) as conn:
            conn.execute(
                f"UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state NOT IN ({', '.join('?' * len(finals))})",
                (job_id, *finals),
            )
            self._notify(conn, NOTICE_CANCEL, job_id)
            return self._get(conn, job_id)

    def record_attempt(self, job_id: str, *, resumed: bool) -> JobRecord:
        with self._tx(write=True) as conn:
            conn.execute(
                "UPDATE jobs SET attempts = attempts + 1, resume_count = resume_count + ? WHERE id = ?",
                (int(resumed), job_id),
            )
            return self._get(conn, job_id)

    def record_resume(self, job_id: str) -> JobRecord:
        """A worker resumed the job from a checkpoint (known only once it has started)."""
        with self._tx(write=True) as conn:
            conn.execute("UPDATE jobs SET resume_count = resume_count + 1 WHERE id = ?", (job_id,))
            return self._get(conn, job_id)

    def next_queued(self) -> JobRecord | None:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY queue_position LIMIT 1", (JobState.QUEUED.value,)
            ).fetchone()
        return None if row is None else _job(row)

    # -- leases --------------------------------------------------------------------------------------------------

    def claim_next(self, server_id: str, lease_seconds: float, *, now: float, message: str = "") -> JobRecord | None:
        """Take the oldest queued job: RUNNING under a fresh lease of `server_id` (epoch + 1), with its event."""
        with self._tx(write=True) as conn:
            row = conn.execute(
                f"SELECT * FROM jobs WHERE state = ? ORDER BY queue_position LIMIT 1{self.SKIP_LOCKED}",
                (JobState.QUEUED.value,),
            ).fetchone()
            if row is None:
                return None
            job = _job(row)
            self._change_state(conn, job, JobState.RUNNING, now=now, message=message, claim=(server_id, lease_seconds))
            claimed = self._get(conn, job.id)
        log.info("job_claimed", job_id=job.id, server_id=server_id, lease_epoch=claimed.lease_epoch)
        return claimed

    def renew_lease(self, job_id: str, lease: Lease, lease_seconds: float) -> JobRecord:
        """Push the lease's expiry to `lease_seconds` from now (the database's clock); `LeaseLost` when it is gone."""
        with self._tx(write=True) as conn:
            row = conn.execute(
                f"UPDATE jobs SET lease_expires = {self.NOW_SQL} + ?"
                " WHERE id = ? AND state = ? AND lease_owner = ? AND lease_epoch = ? RETURNING *",
                (lease_seconds, job_id, JobState.RUNNING.value, lease.owner, lease.epoch),
            ).fetchone()
            if row is None:
                self._get(conn, job_id)
                raise LeaseLost(job_id)
            return _job(row)

    def release_lease(self, job_id: str, lease: Lease, *, now: float, message: str) -> JobRecord:
        """Give the job back to the queue (its place kept) so that any server takes it at once."""
        job, _ = self.transition(job_id, JobState.QUEUED, now=now, message=message, lease=lease)
        return job

    def requeue_expired(self, *, now: float, message: str, everything: bool = False) -> list[JobRecord]:
        """Put RUNNING jobs whose lease expired (or that have none) back in the queue, each with a state-change
        event saying `message`; `everything`: every RUNNING job (a private store's server restarting)."""
        expired = (
            "" if everything else f" AND (lease_owner = '' OR lease_expires IS NULL OR lease_expires < {self.NOW_SQL})"
        )
        with self._tx(write=True) as conn:
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE state = ?{expired} ORDER BY queue_position{self.SKIP_LOCKED}",
                (JobState.RUNNING.value,),
            ).fetchall()
            jobs = [_job(r) for r in rows]
            for job in jobs:
                self._change_state(conn, job, JobState.QUEUED, now=now, message=message)
                log.info("job_lease_expired", job_id=job.id, lease_owner=job.lease_owner, epoch=job.lease_epoch)
            return [self._get(conn, job.id) for job in jobs]

    def jobs_in_state(self, state: JobState) -> list[JobRecord]:
        with self._tx() as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE state = ? ORDER BY queue_position", (state.value,)).fetchall()
        return [_job(r) for r in rows]

    def count_in_state(self, state: JobState) -> int:
        with self._tx() as conn:
            row = conn.execute("SELECT COUNT(*) AS n FROM jobs WHERE state = ?", (state.value,)).fetchone()
        return int(row["n"])

    # -- datasets and artifacts ----------------------------------------------------------------------------------

    def put_dataset(self, record: DatasetRecord) -> tuple[DatasetRecord, bool]:
        """Store an upload once per content and owner: the same sha256 returns the owner's dataset already stored."""
        with self._tx(write=True) as conn:
            inserted = conn.execute(
                "INSERT INTO datasets (id, owner, filename, size_bytes, sha256, path, report, create_time)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (
                    record.id,
                    record.owner,
                    record.filename,
                    record.size_bytes,
                    record.sha256,
                    record.path,
                    json.dumps(record.report),
                    record.create_time,
                ),
            ).rowcount
            if inserted != 1:
                row = conn.execute(
                    "SELECT * FROM datasets WHERE owner = ? AND sha256 = ?", (record.owner, record.sha256)
                ).fetchone()
                return _dataset(row), False
        log.info("dataset_stored", dataset_id=record.id, size_bytes=record.size_bytes)
        return record, True

    def put_artifact(self, record: ArtifactRecord) -> ArtifactRecord:
        """Record an export (its folder is complete before this is called); the same id replaces the old record."""
        columns = (
            "job_id", "owner", "format", "step", "base_model", "path", "files", "total_size_bytes", "vllm",
            "create_time",
        )  # fmt: skip
        with self._tx(write=True) as conn:
            conn.execute(
                f"INSERT INTO artifacts (id, {', '.join(columns)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                f" ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in columns)}",
                (
                    record.id,
                    record.job_id,
                    record.owner,
                    record.format,
                    record.step,
                    record.base_model,
                    record.path,
                    json.dumps(record.files),
                    record.total_size_bytes,
                    json.dumps(record.vllm),
                    record.create_time,
                ),
            )
        return record

    def get_artifact(self, artifact_id: str) -> ArtifactRecord:
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM artifacts WHERE id = ?", (artifact_id,)).fetchone()
        if row is None:
            raise KeyError(artifact_id)
        return _artifact(row)

    def list_artifacts(
        self, *, page_size: int, page_token: str, owner: str | None = None, job_id: str = ""
    ) -> tuple[list[ArtifactRecord], str]:
        """Newest first, keyset-paged like list_jobs; `owner` None: everyone's; `job_id`: that job's only."""
        where, params = (["owner = ?"], [owner]) if owner is not None else ([], [])
        if job_id:
            where.append("job_id = ?")
            params.append(job_id)
        rows, next_token = self._newest_first("artifacts", where, params, page_size, page_token)
        return [_artifact(r) for r in rows], next_token

    def delete_artifact(self, artifact_id: str) -> ArtifactRecord:
        """Remove an artifact's record (its folder is the caller's to remove); returns the record as it was."""
        return _artifact(self._delete_row("artifacts", artifact_id))

    def get_dataset(self, dataset_id: str) -> DatasetRecord:
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
        if row is None:
            raise KeyError(dataset_id)
        return _dataset(row)

    def find_dataset_by_sha256(self, sha256: str, owner: str = "") -> DatasetRecord | None:
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM datasets WHERE owner = ? AND sha256 = ?", (owner, sha256)).fetchone()
        return None if row is None else _dataset(row)

    def list_datasets(
        self, *, page_size: int, page_token: str, owner: str | None = None
    ) -> tuple[list[DatasetRecord], str]:
        """Newest first, keyset-paged like list_jobs; `owner` None: everyone's."""
        where, params = (["owner = ?"], [owner]) if owner is not None else ([], [])
        rows, next_token = self._newest_first("datasets", where, params, page_size, page_token)
        return [_dataset(r) for r in rows], next_token

    def delete_dataset(self, dataset_id: str) -> DatasetRecord:
        """Remove a dataset's record (its file is the caller's to remove); returns the record as it was."""
        return _dataset(self._delete_row("datasets", dataset_id))

    def _delete_row(self, table: str, record_id: str) -> Any:
        """Delete `table`'s row `record_id` (a table name of ours, never a caller's) and return it as it was; KeyError
        when there is none."""
        with self._tx(write=True) as conn:
            row = conn.execute(f"SELECT * FROM {table} WHERE id = ?", (record_id,)).fetchone()
            if row is None:
                raise KeyError(record_id)
            conn.execute(f"DELETE FROM {table} WHERE id = ?", (record_id,))
        log.info("record_deleted", table=table, record_id=record_id)
        return row

    # -- the store itself ----------------------------------------------------------------------------------------

    def bind_data_dir(self, data_dir_id: str) -> str:
        """Record the data dir this store belongs to, unless one is recorded; returns the recorded one."""
        with self._tx(write=True) as conn:
            conn.execute(
                "INSERT INTO store_meta (key, value) VALUES ('data_dir_id', ?) ON CONFLICT DO NOTHING", (data_dir_id,)
            )
            row = conn.execute("SELECT value FROM store_meta WHERE key = 'data_dir_id'").fetchone()
        return str(row["value"])

    def _sequence_problems(self) -> list[str]:
        """Jobs whose counter disagrees with their stored events (a gap or a lost event)."""
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT j.id AS id, j.last_sequence AS last, COUNT(e.sequence) AS n,"
                " COALESCE(MAX(e.sequence), 0) AS top"
                " FROM jobs j LEFT JOIN job_events e ON e.job_id = j.id GROUP BY j.id, j.last_sequence"
                " HAVING COUNT(e.sequence) != j.last_sequence OR COALESCE(MAX(e.sequence), 0) != j.last_sequence"
            ).fetchall()
        return [f"job {r['id']}: last_sequence {r['last']}, {r['n']} events up to {r['top']}" for r in rows]


class SqliteJobStore(SqlJobStore, JobStore):
    """The embedded store: one SQLite file in the data dir, used by one server."""

    NOW_SQL = "((julianday('now') - 2440587.5) * 86400.0)"
    NEXT_QUEUE_POSITION = "(SELECT COALESCE(MAX(queue_position), 0) + 1 FROM jobs)"  # writes are serialised
    INTEGRITY_ERRORS = (sqlite3.IntegrityError,)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("sqlite_wal_unavailable", path=str(self.path), journal_mode=mode)
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            found = apply_migrations(self._conn)
        except BaseException:
            self._conn.close()
            raise
        if found != SCHEMA_VERSION:
            log.info("job_store_migrated", path=str(self.path), from_version=found, to_version=SCHEMA_VERSION)

    def __enter__(self) -> SqliteJobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, *, write: bool = False) -> Iterator[Connection]:
        """One transaction under the lock; IMMEDIATE for writes so a read never has to upgrade to a write lock."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def integrity_check(self) -> str:
        """SQLite's own check and the event sequences': "ok", or the problems found joined by newlines."""
        with self._lock:
            rows = self._conn.execute("PRAGMA integrity_check").fetchall()
        problems = [str(r[0]) for r in rows if str(r[0]) != "ok"] + self._sequence_problems()
        return "\n".join(problems) or "ok"

    def try_lock(self, name: str) -> StoreLock | None:
        return _LocalLock()

    def reachable(self) -> bool:
        try:
            with self._lock:
                self._conn.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            self._conn.close()
