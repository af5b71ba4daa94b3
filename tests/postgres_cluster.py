"""A throw-away PostgreSQL 15 cluster for the tests: initdb into a temp dir, a free port, no fsync.

Debian's server binaries live in their version's bin folder (not on PATH). The server refuses to run as root, so
when the tests run as root (CI does) initdb and pg_ctl run as the `postgres` user, in a folder that user owns.
Failing to start raises: the tests that need PostgreSQL fail, they never skip.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path(os.environ.get("FINETUNE_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"
FAST = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresCluster:
    root: Path
    port: int
    _user: str | None
    _names: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _as_owner(self, *command: str | Path) -> list[str]:
        """`command` as the cluster's owner. Through runuser, not subprocess's `user=`: on Python 3.11 that forces a
        plain fork(), which runs gRPC's fork handlers in the child of a test process with gRPC threads (a child that
        then died with SIGSEGV before pg_ctl ran); without it the child is started with vfork, which runs none."""
        prefix = ["runuser", "-u", self._user, "--"] if self._user is not None else []
        return [*prefix, *(str(c) for c in command)]

    def _run(self, *command: str | Path) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self._as_owner(*command), capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n{log}")
        return result

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[object, ...]]:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cursor = conn.execute(statement.encode())
            return list(cursor.fetchall()) if cursor.description else []

    def new_database(self) -> str:
        """A fresh, empty database's URL (CREATE DATABASE from template0: a few tens of ms without fsync)."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.sql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def pg_ctl(self, *args: str) -> None:
        self._run(PG_BIN / "pg_ctl", *args, "-w", "-t", "60", "-D", self.data)

    def start(self) -> None:
        options = f"-c port={self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} {FAST}"
        self.pg_ctl("start", "-l", str(self.root / "server.log"), "-o", options)

    def stop(self) -> None:
        subprocess.run(
            self._as_owner(PG_BIN / "pg_ctl", "stop", "-D", self.data, "-m", "immediate"),
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> PostgresCluster:
    user = SUPERUSER if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = PostgresCluster(root, _free_port(), user)
    try:
        cluster._run(PG_BIN / "initdb", "-D", cluster.data, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync")
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
