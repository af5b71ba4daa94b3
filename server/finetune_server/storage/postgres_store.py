"""The job store on PostgreSQL, shared by several servers: psycopg 3 with a connection pool.

The SQL is `SqlJobStore`'s; this module adds what PostgreSQL does differently: its own versioned migrations, applied
under an advisory lock so that servers starting together apply them once; `FOR UPDATE SKIP LOCKED` claims (two
servers never take the same queued job); queue positions from a sequence; and LISTEN/NOTIFY as the wake-up between
servers, on a connection of its own. Notices are hints: listeners re-read the tables, so a lost one only delays.

The URL never carries a password (libpq reads PGPASSWORD or ~/.pgpass); it is logged with any password removed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import structlog
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.storage.job_store import (
    NOTICE_RESYNC,
    Connection,
    JobStore,
    OnNotice,
    SchemaTooNewError,
    SqlJobStore,
    StoreLock,
    StoreUnavailableError,
)
from finetune_server.storage.store_url import redact

log = structlog.get_logger(__name__)

NOTICE_CHANNEL = "finetune_jobs"
LISTENER_APPLICATION = "finetune-listener"  # the listener connection's application_name (operators can spot it)
CONNECT_TIMEOUT_S = 5
POOL_SIZE = 8
POOL_TIMEOUT_S = 5.0  # a call waits this long for a connection (the database may be restarting) before it fails
# pg_advisory_xact_lock key of the migrations ("ftmig" in ASCII): one server migrates, the others wait, then see it.
MIGRATION_LOCK_KEY = 0x66746D6967
LISTENER_RETRY_S = 0.5

# Migration N (1-based) brings the database from version N-1 to N. Append only; never edit a released step.
# Ids sort bytewise (COLLATE "C") as in SQLite, so keyset paging agrees between the stores.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            id TEXT COLLATE "C" PRIMARY KEY,
            state TEXT NOT NULL,
            config TEXT NOT NULL,
            request_id TEXT NOT NULL DEFAULT '',
            request_fingerprint TEXT NOT NULL DEFAULT '',
            display_name TEXT NOT NULL DEFAULT '',
            owner TEXT COLLATE "C" NOT NULL DEFAULT '',
            create_time DOUBLE PRECISION NOT NULL,
            start_time DOUBLE PRECISION,
            end_time DOUBLE PRECISION,
            progress TEXT,
            error TEXT,
            result TEXT,
            resume_count INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_sequence BIGINT NOT NULL DEFAULT 0,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            queue_position BIGINT NOT NULL,
            lease_owner TEXT NOT NULL DEFAULT '',
            lease_epoch BIGINT NOT NULL DEFAULT 0,
            lease_expires DOUBLE PRECISION
        )""",
        "CREATE SEQUENCE jobs_queue_position",
        "CREATE UNIQUE INDEX jobs_request_id ON jobs (owner, request_id) WHERE request_id != ''",
        "CREATE INDEX jobs_newest ON jobs (create_time DESC, id DESC)",
        "CREATE INDEX jobs_owner_newest ON jobs (owner, create_time DESC, id DESC)",
        "CREATE INDEX jobs_state_queue ON jobs (state, queue_position)",
        """CREATE TABLE job_events (
            job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            sequence BIGINT NOT NULL,
            time DOUBLE PRECISION NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            PRIMARY KEY (job_id, sequence)
        )""",
        """CREATE TABLE datasets (
            id TEXT COLLATE "C" PRIMARY KEY,
            owner TEXT COLLATE "C" NOT NULL DEFAULT '',
            filename TEXT NOT NULL,
            size_bytes BIGINT NOT NULL,
            sha256 TEXT NOT NULL,
            path TEXT NOT NULL,
            report TEXT NOT NULL,
            create_time DOUBLE PRECISION NOT NULL,
            UNIQUE (owner, sha256)
        )""",
        "CREATE INDEX datasets_owner_newest ON datasets (owner, create_time DESC, id DESC)",
        "CREATE INDEX datasets_newest ON datasets (create_time DESC, id DESC)",
        """CREATE TABLE artifacts (
            id TEXT PRIMARY KEY,
            job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            format TEXT NOT NULL,
            step INTEGER NOT NULL,
            base_model TEXT NOT NULL,
            path TEXT NOT NULL,
            files TEXT NOT NULL,
            total_size_bytes BIGINT NOT NULL,
            vllm TEXT NOT NULL,
            create_time DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE request_keys (
            owner TEXT NOT NULL,
            method TEXT NOT NULL,
            request_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            resource_id TEXT NOT NULL,
            create_time DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (owner, method, request_id)
        )""",
        "CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    (
        # Artifacts outlive the job they came from (DeleteJob keeps them unless asked to delete them too): they
        # hold their owner themselves and no longer cascade from jobs. Older ones take their job's owner.
        "ALTER TABLE artifacts DROP CONSTRAINT artifacts_job_id_fkey",
        'ALTER TABLE artifacts ALTER COLUMN id TYPE TEXT COLLATE "C"',
        "ALTER TABLE artifacts ADD COLUMN owner TEXT COLLATE \"C\" NOT NULL DEFAULT ''",
        "UPDATE artifacts SET owner = jobs.owner FROM jobs WHERE jobs.id = artifacts.job_id",
        "CREATE INDEX artifacts_owner_newest ON artifacts (owner, create_time DESC, id DESC)",
        "CREATE INDEX artifacts_newest ON artifacts (create_time DESC, id DESC)",
        "CREATE INDEX artifacts_job ON artifacts (job_id)",
        # Labels: on the job row as read back, and one row per label for ListJobs' filter.
        "ALTER TABLE jobs ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'",
        """CREATE TABLE job_labels (
            job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (job_id, key)
        )""",
        "CREATE INDEX job_labels_key_value ON job_labels (key, value)",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


def apply_migrations(conn: psycopg.Connection[Any], migrations: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Bring the database to `len(migrations)` in one transaction under the migration lock; returns the version
    it was at. Servers starting together wait for the first one's transaction, then find nothing to do."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS finetune_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM finetune_schema").fetchone()
        if row is None:
            conn.execute("INSERT INTO finetune_schema (version) VALUES (0)")
        found = 0 if row is None else int(row[0])
        if found > len(migrations):
            raise SchemaTooNewError(
                f"database schema version {found} is newer than this server knows ({len(migrations)}); "
                "upgrade sage-finetune or use another database"
            )
        for version in range(found + 1, len(migrations) + 1):
            for statement in migrations[version - 1]:
                conn.execute(statement)
            conn.execute("UPDATE finetune_schema SET version = %s", (version,))
    return found


class _Placeholders:
    """A psycopg connection that takes the shared SQL's `?` placeholders."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), params)


class PostgresJobStore(SqlJobStore, JobStore):
    """Jobs, events, datasets and artifacts in one PostgreSQL database that several servers share."""

    shared = True
    NOW_SQL = "extract(epoch from clock_timestamp())::double precision"
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    FOR_UPDATE = " FOR UPDATE"
    NEXT_QUEUE_POSITION = "nextval('jobs_queue_position')"
    INTEGRITY_ERRORS = (psycopg.errors.UniqueViolation,)

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE, pool_timeout_s: float = POOL_TIMEOUT_S) -> None:
        self.url = url
        self._conninfo = make_conninfo(url, connect_timeout=CONNECT_TIMEOUT_S)
        try:
            with psycopg.connect(self._conninfo) as conn:
                found = apply_migrations(conn)
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailableError(f"cannot reach the job store at {redact(url)}: {reason}") from None
        if found != SCHEMA_VERSION:
            log.info("job_store_migrated", store=redact(url), from_version=found, to_version=SCHEMA_VERSION)
        self._pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=pool_size,
            kwargs={"row_factory": dict_row},
            open=True,
            timeout=pool_timeout_s,
            # A connection the database closed (a restart, pg_terminate_backend, an idle timeout) is replaced when
            # taken from the pool instead of failing the call that took it.
            check=ConnectionPool.check_connection,
            name="finetune-store",
        )

    def __enter__(self) -> PostgresJobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, *, write: bool = False) -> Iterator[Connection]:
        """One transaction on a pooled connection: committed when the block ends, rolled back when it raises."""
        try:
            with self._pool.connection() as conn:
                yield _Placeholders(conn)
        except (PoolTimeout, psycopg.OperationalError) as exc:
            if isinstance(exc, psycopg.OperationalError) and not _connection_lost(exc):
                raise
            raise _unavailable(self.url, exc) from exc

    def _notify(self, conn: Connection, kind: str, job_id: str) -> None:
        conn.execute("SELECT pg_notify(?, ?)", (NOTICE_CHANNEL, f"{kind}:{job_id}"))

    def listen(self, on_notice: OnNotice) -> Callable[[], None]:
        """Relay other servers' notices to `on_notice` from a thread with its own connection, reconnecting when
        the connection is lost (then `NOTICE_RESYNC`: whatever was missed is re-read)."""
        listener = _Listener(self._conninfo, on_notice)
        listener.start()
        return listener.stop

    def integrity_check(self) -> str:
        """PostgreSQL checks its own pages; this checks what is ours: every job's events are gap-free."""
        return "\n".join(self._sequence_problems()) or "ok"

    def try_lock(self, name: str) -> StoreLock | None:
        """A session-level advisory lock on a connection of its own, held until `release` (or until this server's
        connection dies with it: a dead server's locks go with its sessions)."""
        try:
            conn = self._pool.getconn()
        except PoolTimeout as exc:
            raise _unavailable(self.url, exc) from exc
        try:  # a session lock outlives the transaction that took it: commit, and hold no transaction open
            row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0)) AS got", (name,)).fetchone()
            conn.commit()
        except BaseException:
            self._pool.putconn(conn)
            raise
        if row is None or not row["got"]:
            self._pool.putconn(conn)
            return None
        return _AdvisoryLock(self._pool, conn, name)

    def reachable(self) -> bool:
        try:
            with self._tx() as conn:
                conn.execute("SELECT 1")
        except FinetuneError:  # STORE_UNAVAILABLE: the connection is lost, or none could be had in time
            return False
        return True

    def close(self) -> None:
        self._pool.close()


class _AdvisoryLock:
    def __init__(self, pool: ConnectionPool[Any], conn: psycopg.Connection[Any], name: str) -> None:
        self._pool, self._conn, self._name = pool, conn, name

    def release(self) -> None:
        try:
            self._conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (self._name,))
            self._conn.commit()
        except psycopg.OperationalError:  # the connection is gone, and the lock with it
            pass
        finally:
            self._pool.putconn(self._conn)


def _unavailable(url: str, exc: Exception) -> FinetuneError:
    log.warning("job_store.unavailable", store=redact(url), error=" ".join(str(exc).split()))
    return FinetuneError(
        ErrorKind.UNAVAILABLE,
        "STORE_UNAVAILABLE",
        "the server cannot reach its job store right now",
        hint="Retry shortly: the server reconnects by itself.",
    )


def _connection_lost(exc: psycopg.OperationalError) -> bool:
    """The connection failed (class 08, or the server shutting down), as opposed to a statement's own error."""
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in {"57P01", "57P02", "57P03"}


class _Listener:
    def __init__(self, conninfo: str, on_notice: OnNotice) -> None:
        self._conninfo = conninfo
        self._on_notice = on_notice
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="finetune-store-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, application_name=LISTENER_APPLICATION) as conn:
                    conn.execute(f"LISTEN {NOTICE_CHANNEL}")
                    self._on_notice(NOTICE_RESYNC, "")
                    while not self._stopping.is_set():
                        for notice in conn.notifies(timeout=LISTENER_RETRY_S):
                            kind, _, job_id = notice.payload.partition(":")
                            self._on_notice(kind, job_id)
            except psycopg.Error as exc:
                log.warning("store_listener_lost", error=" ".join(str(exc).split()))
                self._stopping.wait(LISTENER_RETRY_S)
