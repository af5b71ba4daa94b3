"""Soak tests (marker `soak`): long chaos and load runs against a real server, run by `make test-soak` only.

pyproject's `testpaths` leaves this folder out, so a plain `pytest` or `make test` never collects them; name the
folder to run them (`pytest -m soak tests/soak`). Each writes its figures into its own section of
bench/results/reliability.md.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..integration.conftest import RunningServer, server_roots, start_server, stop_server
from ..reliability_report import machine, write_report_section

__all__ = ["RunningServer", "machine", "server_roots", "start_server", "stop_server", "write_report_section"]


def integrity_check(data_dir: Path) -> list[tuple[str, ...]]:
    with sqlite3.connect(f"file:{data_dir / 'finetune.db'}?mode=ro", uri=True) as db:
        return db.execute("PRAGMA integrity_check").fetchall()
