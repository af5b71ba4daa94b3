"""Shared fixtures and helpers: the tiny offline model is built once per test session."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from .postgres_cluster import PostgresCluster, start_cluster


def pytest_configure(config: pytest.Config) -> None:
    """Deliver Ctrl-C as Python's KeyboardInterrupt, here and in the CLIs the tests start (they inherit it).

    A suite started in the background (`nohup`, `&` in a shell without job control) inherits SIGINT ignored, and
    the tests that press Ctrl-C on a CLI, or on `follow` in this process, would then wait for an exit that never
    comes."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first, those with the most of them first, each file's tests in their order: under
    `-n 2 --dist loadfile` (make test) a worker takes whole files in this order, so the long ones start early and
    the short ones even out the end instead of one long file ending the run on one worker."""
    slow_tests = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow_tests[item.path])  # stable


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen2-style model (~0.5 MB) with a BPE tokenizer trained on the fly and a ChatML template."""
    from finetune_server.demo.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


def write_alpaca(path: Path, n: int = 16) -> Path:
    """`n` alpaca rows of made-up facts (a number per city), one JSON object per line."""
    with path.open("w") as f:
        for i in range(n):
            record = {"instruction": f"What is the secret number of city {i}?", "output": f"It is {i * 37}."}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throw-away PostgreSQL cluster for the session (starting it fails the test, never skips it)."""
    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A fresh database of the session's cluster, so tests stay independent."""
    return postgres_cluster.new_database()
