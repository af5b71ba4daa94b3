"""Soak tests (marker `soak`): long chaos and load runs against a real server, run by `make test-soak` only.

pyproject's `testpaths` leaves this folder out, so a plain `pytest` or `make test` never collects them; name the
folder to run them (`pytest -m soak tests/soak`). Each writes its figures into its own section of
bench/results/reliability.md.
"""

from __future__ import annotations

import os
import platform
import re
import sqlite3
from pathlib import Path

from ..integration.conftest import RunningServer, server_roots, start_server, stop_server

__all__ = ["RunningServer", "server_roots", "start_server", "stop_server"]

REPORT = Path(__file__).resolve().parents[2] / "bench" / "results" / "reliability.md"
_TITLE = "# Reliability: chaos and load soak runs\n"
_PREAMBLE = (
    "Written by `make test-soak` (tests/soak). Each section is replaced by its test's latest run; numbers are from "
    "the machine named in the section.\n"
)


def integrity_check(data_dir: Path) -> list[tuple[str, ...]]:
    with sqlite3.connect(f"file:{data_dir / 'finetune.db'}?mode=ro", uri=True) as db:
        return db.execute("PRAGMA integrity_check").fetchall()


def write_report_section(name: str, markdown: str) -> Path:
    """Replace (or append) the section `name` of the reliability report, keeping the other sections."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}\n"
    text = REPORT.read_text(encoding="utf-8") if REPORT.is_file() else _TITLE + "\n" + _PREAMBLE + "\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(text, encoding="utf-8")
    return REPORT


def machine(load_at_start: float) -> str:
    """The machine, and how busy it was: other processes share the CPUs and move every timing."""
    one_minute = os.getloadavg()[0]
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}; "
        f"1-min load average {load_at_start:.1f} at the start, {one_minute:.1f} at the end"
    )
