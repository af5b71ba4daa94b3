"""The job service's persistent state: jobs, their numbered events and uploaded datasets.

`JobStore` is the seam the scheduler, event fan-out and servicers talk to; `SqliteJobStore` is the embedded default
(a later PostgreSQL store implements the same methods so several servers can share one queue).

Durability first: every method is one committed transaction on a WAL database with `synchronous=FULL`, so whatever
a method returned survives a `kill -9` of the server or a power cut. Events are a few per second, so an fsync per
write is affordable. One connection guarded by a lock serves the asyncio thread and worker threads alike; writes use
`BEGIN IMMEDIATE` so that several processes on the same file (tests, a CLI beside the server) serialise cleanly
instead of failing on lock upgrades.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import sqlite3
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import structlog

from finetune_server.storage.records import (
    FINAL_STATES,
    ArtifactRecord,
    DatasetRecord,
    EventKind,
    JobEventRecord,
    JobRecord,
    JobState,
)

log = structlog.get_logger(__name__)

BUSY_TIMEOUT_MS = 10_000


class InvalidTransition(Exception):  # noqa: N818 - the name other modules catch
    """A state change was asked for a job whose current state is not one the caller expected."""

    def __init__(self, current: JobState, job_id: str = "") -> None:
        super().__init__(f"job {job_id or '?'} is {current.name}")
        self.current = current
        self.job_id = job_id


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer version of the server; opening it could corrupt it."""


class JobStore(Protocol):
    """What the job service needs from its storage. Unknown ids raise `KeyError(id)`."""

    def create_job(
        self,
        *,
        job_id: str,
        config: dict[str, Any],
        request_id: str = "",
        request_fingerprint: str = "",
        display_name: str = "",
        owner: str = "",
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
    ) -> tuple[list[JobRecord], str]: ...

    def append_event(self, job_id: str, kind: EventKind, payload: dict[str, Any], *, now: float) -> JobEventRecord: ...

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
    ) -> tuple[JobRecord, JobEventRecord]: ...

    def events_after(self, job_id: str, after_sequence: int, limit: int = 1000) -> list[JobEventRecord]: ...

    def request_cancel(self, job_id: str) -> JobRecord: ...

    def record_attempt(self, job_id: str, *, resumed: bool) -> JobRecord: ...

    def record_resume(self, job_id: str) -> JobRecord: ...

    def next_queued(self) -> JobRecord | None: ...

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

    def integrity_check(self) -> str: ...

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
    # NaN/inf are kept (a NAN_LOSS progress report must still be stored); json.loads reads them back.
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _loads(text: str | None) -> dict[str, Any] | None:
    return None if text is None else json.loads(text)


def _job(row: sqlite3.Row) -> JobRecord:
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
    )


def _event(row: sqlite3.Row) -> JobEventRecord:
    return JobEventRecord(
        job_id=row["job_id"],
        sequence=row["sequence"],
        time=row["time"],
        kind=EventKind(row["kind"]),
        payload=json.loads(row["payload"]),
    )


def _dataset(row: sqlite3.Row) -> DatasetRecord:
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


class SqliteJobStore(JobStore):
    """The embedded store: one SQLite file in the data dir."""

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
    def _tx(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock; IMMEDIATE for writes so a read never has to upgrade to a write lock."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    # -- jobs ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _get(conn: sqlite3.Connection, job_id: str) -> JobRecord:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job(row)

    @staticmethod
    def _append(
        conn: sqlite3.Connection, job_id: str, kind: EventKind, payload: dict[str, Any], now: float
    ) -> JobEventRecord:
        row = conn.execute("SELECT last_sequence FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        sequence = row[0] + 1
        text = json.dumps(payload, separators=(",", ":"))
        conn.execute(
            "INSERT INTO job_events (job_id, sequence, time, kind, payload) VALUES (?, ?, ?, ?, ?)",
            (job_id, sequence, now, kind.value, text),
        )
        if kind is EventKind.PROGRESS:
            conn.execute("UPDATE jobs SET last_sequence = ?, progress = ? WHERE id = ?", (sequence, text, job_id))
        else:
            conn.execute("UPDATE jobs SET last_sequence = ? WHERE id = ?", (sequence, job_id))
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
        now: float,
    ) -> tuple[JobRecord, bool]:
        """Insert a QUEUED job at the back of the queue with its first event; the owner's known request_id returns
        its job (the caller compares `request_fingerprint` to tell a retry from a reused key)."""
        try:
            with self._tx(write=True) as conn:
                conn.execute(
                    "INSERT INTO jobs (id, state, config, request_id, request_fingerprint, display_name, owner,"
                    " create_time, queue_position)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(queue_position), 0) + 1 FROM jobs))",
                    (
                        job_id,
                        JobState.QUEUED.value,
                        json.dumps(config),
                        request_id,
                        request_fingerprint,
                        display_name,
                        owner,
                        now,
                    ),
                )
                self._append(
                    conn,
                    job_id,
                    EventKind.STATE_CHANGE,
                    {"previous": None, "current": JobState.QUEUED.name, "message": "queued"},
                    now,
                )
                job = self._get(conn, job_id)
        except sqlite3.IntegrityError:
            # The UNIQUE index decides races between callers (threads or processes) with the same request_id.
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
                "INSERT OR IGNORE INTO request_keys (owner, method, request_id, fingerprint, resource_id, create_time)"
                " VALUES (?, ?, ?, ?, ?, ?)",
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
    ) -> tuple[list[JobRecord], str]:
        """Newest first, keyset-paged on (create_time, id); an empty `states` means no filter, like None."""
        where: list[str] = []
        params: list[Any] = []
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params.extend(s.value for s in states)
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        rows, next_token = self._newest_first("jobs", where, params, page_size, page_token)
        return [_job(r) for r in rows], next_token

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

    def append_event(self, job_id: str, kind: EventKind, payload: dict[str, Any], *, now: float) -> JobEventRecord:
        """Number the event after the job's newest; a PROGRESS payload also becomes the job's progress."""
        with self._tx(write=True) as conn:
            return self._append(conn, job_id, kind, payload, now)

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
    ) -> tuple[JobRecord, JobEventRecord]:
        """Compare-and-set the state and record it; a result event goes first so a success ends on its state change."""
        with self._tx(write=True) as conn:
            job = self._get(conn, job_id)
            if expect is not None and job.state not in expect:
                raise InvalidTransition(job.state, job_id)
            sets = ["state = ?"]
            params: list[Any] = [new_state.value]
            if new_state is JobState.RUNNING and job.start_time is None:
                sets.append("start_time = ?")
                params.append(now)
            if new_state.is_final:
                sets.extend(("end_time = ?", "cancel_requested = 0"))
                params.append(now)
            if error is not None:
                sets.append("error = ?")
                params.append(_dumps(error))
            if result is not None:
                sets.append("result = ?")
                params.append(_dumps(result))
                self._append(conn, job_id, EventKind.RESULT, result, now)
            conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*params, job_id))
            payload: dict[str, Any] = {"previous": job.state.name, "current": new_state.name, "message": message}
            if error is not None:
                payload["error"] = error
            event = self._append(conn, job_id, EventKind.STATE_CHANGE, payload, now)
            updated = self._get(conn, job_id)
        log.info("job_transition", job_id=job_id, previous=job.state.name, current=new_state.name)
        return updated, event

    def events_after(self, job_id: str, after_sequence: int, limit: int = 1000) -> list[JobEventRecord]:
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
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

    def jobs_in_state(self, state: JobState) -> list[JobRecord]:
        with self._tx() as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE state = ? ORDER BY queue_position", (state.value,)).fetchall()
        return [_job(r) for r in rows]

    def count_in_state(self, state: JobState) -> int:
        with self._tx() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state.value,)).fetchone()[0])

    # -- datasets ------------------------------------------------------------------------------------------------

    def put_dataset(self, record: DatasetRecord) -> tuple[DatasetRecord, bool]:
        """Store an upload once per content and owner: the same sha256 returns the owner's dataset already stored."""
        with self._tx(write=True) as conn:
            row = conn.execute(
                "SELECT * FROM datasets WHERE owner = ? AND sha256 = ?", (record.owner, record.sha256)
            ).fetchone()
            if row is not None:
                return _dataset(row), False
            conn.execute(
                "INSERT INTO datasets (id, owner, filename, size_bytes, sha256, path, report, create_time)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
            )
        log.info("dataset_stored", dataset_id=record.id, size_bytes=record.size_bytes)
        return record, True

    def put_artifact(self, record: ArtifactRecord) -> ArtifactRecord:
        """Record an export (its folder is complete before this is called); the same id replaces the old record."""
        with self._tx(write=True) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO artifacts (id, job_id, format, step, base_model, path, files, total_size_bytes,"
                " vllm, create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.job_id,
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
        )

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
        with self._tx(write=True) as conn:
            row = conn.execute("SELECT * FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
            if row is None:
                raise KeyError(dataset_id)
            conn.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,))
        log.info("dataset_deleted", dataset_id=dataset_id)
        return _dataset(row)

    # -- maintenance ---------------------------------------------------------------------------------------------

    def integrity_check(self) -> str:
        """SQLite's own check: "ok", or the problems it found joined by newlines."""
        with self._lock:
            rows = self._conn.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
