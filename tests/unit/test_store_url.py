"""--store URLs, the data dir's id check, and what a server that cannot use its store says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.storage.data_dir_id import DataDirMismatchError, check_data_dir
from finetune_server.storage.job_store import SqliteJobStore, StoreUnavailableError
from finetune_server.storage.postgres_store import PostgresJobStore
from finetune_server.storage.records import EventKind
from finetune_server.storage.store_url import open_job_store, parse_store_url, redact

from ..postgres_cluster import PostgresCluster, start_cluster


def test_no_url_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    default = tmp_path / "finetune.db"
    parsed = parse_store_url("", default)
    assert (parsed.scheme, parsed.sqlite_path) == ("sqlite", default)
    store = open_job_store(parsed)
    assert isinstance(store, SqliteJobStore) and not store.shared
    store.close()


def test_urls_name_their_store(tmp_path: Path) -> None:
    assert parse_store_url("sqlite:///srv/jobs.db", tmp_path).sqlite_path == Path("/srv/jobs.db")
    for url in ("postgresql://ft@db:5432/finetune", "postgres://ft@db/finetune"):
        parsed = parse_store_url(url, tmp_path)
        assert (parsed.scheme, parsed.url, parsed.sqlite_path) == ("postgresql", url, None)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://u@h/db", "unknown store 'mysql'"),
        ("jobs.db", "unknown store"),
        ("sqlite://", "sqlite:///absolute"),
        ("sqlite://host/x.db", "sqlite:///absolute"),
        ("postgresql://u:secret@h/db", "PGPASSWORD"),
        ("postgresql://u@h", "name the database"),
    ],
)
def test_unusable_urls_are_refused_with_what_to_write(tmp_path: Path, url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as refused:
        parse_store_url(url, tmp_path)
    assert "secret" not in str(refused.value)


def test_passwords_never_reach_a_log() -> None:
    assert redact("postgresql://ft:s3cret@db:5433/jobs") == "postgresql://ft@db:5433/jobs"
    assert redact("postgresql://ft@db/jobs") == "postgresql://ft@db/jobs"


def test_an_unreachable_database_is_one_clear_error() -> None:
    with pytest.raises(StoreUnavailableError, match=r"cannot reach the job store at postgresql://ft@127\.0\.0\.1:1/"):
        PostgresJobStore("postgresql://ft@127.0.0.1:1/jobs")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_store_belongs_to_the_data_dir_it_first_started_with(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "sqlite":
        store = SqliteJobStore(tmp_path / "store.db")
    else:
        store = PostgresJobStore(request.getfixturevalue("postgres_url"))
    first, second = tmp_path / "one", tmp_path / "two"
    for d in (first, second):
        d.mkdir()
    with store:
        own = check_data_dir(store, first / "data-dir-id", data_dir=first, store_name="the store")
        assert (first / "data-dir-id").read_text().strip() == own
        assert check_data_dir(store, first / "data-dir-id", data_dir=first, store_name="the store") == own
        with pytest.raises(DataDirMismatchError, match=f"the data dir {second} .* not the one the job store"):
            check_data_dir(store, second / "data-dir-id", data_dir=second, store_name="the store")


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "finetune_server.cli.main", "serve", "--port", "0", "--data-dir",
               str(tmp_path / "data"), *args]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=False)


def test_serve_refuses_an_unknown_store_as_a_usage_error(tmp_path: Path) -> None:
    result = _serve(tmp_path, "--store", "mysql://u@h/db")
    assert result.returncode == 2
    assert "unknown store 'mysql'" in result.stderr and "--store" in result.stderr


def test_serve_on_an_unreachable_database_exits_2_with_one_line(tmp_path: Path) -> None:
    result = _serve(tmp_path, "--store", "postgresql://ft@127.0.0.1:1/jobs")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "cannot reach the job store at postgresql://ft@127.0.0.1:1/jobs" in errors[0]
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_data_dir_that_is_not_its_stores(tmp_path: Path, postgres_cluster: PostgresCluster) -> None:
    url = postgres_cluster.new_database()
    with PostgresJobStore(url) as store:
        store.bind_data_dir("dd-another-data-dir")
    result = _serve(tmp_path, "--store", url)
    assert result.returncode == 2, result.stderr
    assert "error: the data dir" in result.stderr and "dd-another-data-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_connections_the_database_closed_are_replaced_unseen(
    postgres_url: str, postgres_cluster: PostgresCluster
) -> None:
    with PostgresJobStore(postgres_url) as store:
        store.create_job(job_id="job-1", config={}, now=1.0)
        database = postgres_url.rsplit("/", 1)[1]
        killed = postgres_cluster.sql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
        )
        assert killed and all(row[0] for row in killed)
        assert store.get_job("job-1").last_sequence == 1
        assert store.append_event("job-1", EventKind.LOG, {"level": "INFO", "message": "x"}, now=2.0).sequence == 2


def test_a_database_lost_while_serving_makes_calls_unavailable_then_they_work_again(tmp_path: Path) -> None:
    cluster = start_cluster()
    try:
        with PostgresJobStore(cluster.new_database(), pool_timeout_s=0.5) as store:
            store.create_job(job_id="job-1", config={}, now=1.0)
            cluster.pg_ctl("stop", "-m", "fast")
            with pytest.raises(FinetuneError) as lost:
                store.get_job("job-1")
            assert (lost.value.kind, lost.value.reason) == (ErrorKind.UNAVAILABLE, "STORE_UNAVAILABLE")
            cluster.start()
            assert store.get_job("job-1").last_sequence == 1
    finally:
        cluster.stop()
