"""`--store URL`: which job store a server opens.

`sqlite:///abs/path/finetune.db` (the embedded default: the data dir's own file when no URL is given) or
`postgresql://user@host:port/db` (also `postgres://`). A password never goes in the URL: libpq reads `PGPASSWORD` or
`~/.pgpass`. `open_job_store` is the one place that turns a URL into a store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from finetune_server.storage.job_store import JobStore

SQLITE_SCHEME = "sqlite"
POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class StoreUrl:
    scheme: str  # "sqlite" or "postgresql"
    url: str  # as given (the default: the data dir's SQLite file)
    sqlite_path: Path | None = None


def parse_store_url(url: str, default_sqlite_path: Path) -> StoreUrl:
    """Check a --store URL; `ValueError` with a message for the user when it cannot be used."""
    if not url:
        return StoreUrl(SQLITE_SCHEME, f"sqlite://{default_sqlite_path}", default_sqlite_path)
    parts = urlsplit(url)
    if parts.scheme == SQLITE_SCHEME:
        if parts.netloc or not parts.path or parts.path == "/":
            raise ValueError("a SQLite store is sqlite:///absolute/path/to/file.db")
        return StoreUrl(SQLITE_SCHEME, url, Path(parts.path))
    if parts.scheme in POSTGRES_SCHEMES:
        if parts.password is not None:
            raise ValueError("put the database password in PGPASSWORD or ~/.pgpass, not in the URL")
        if not parts.path.strip("/"):
            raise ValueError("name the database: postgresql://user@host:port/database")
        return StoreUrl("postgresql", url)
    raise ValueError(f"unknown store {parts.scheme or url!r}: use sqlite:///path or postgresql://user@host/db")


def redact(url: str) -> str:
    """The URL without any password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_job_store(store: StoreUrl) -> JobStore:
    """Open (and migrate) the store the URL names."""
    if store.sqlite_path is not None:
        from finetune_server.storage.job_store import SqliteJobStore

        store.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        return SqliteJobStore(store.sqlite_path)
    try:
        from finetune_server.storage.postgres_store import PostgresJobStore
    except ImportError as exc:
        from finetune_server.storage.job_store import StoreRefusedError

        raise StoreRefusedError(
            f"PostgreSQL support is not installed ({exc.name}): pip install 'sage-finetune[server,postgres]'"
        ) from None
    return PostgresJobStore(store.url)
