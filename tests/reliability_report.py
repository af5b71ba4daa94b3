"""bench/results/reliability.md: the figures of the slow reliability runs (chaos, load, full fuzz), one section each.

Each run replaces its own section and keeps the others, so the file always holds the latest run of every kind.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

REPORT = Path(__file__).resolve().parents[1] / "bench" / "results" / "reliability.md"
_TITLE = "# Reliability: chaos, load and fuzz runs\n"
_PREAMBLE = (
    "Written by `make test-soak` (tests/soak and the full fuzz run of tests/integration/test_fuzz_rpcs.py). Each "
    "section is replaced by its test's latest run; numbers are from the machine named in the section.\n"
)


def write_report_section(name: str, markdown: str) -> Path:
    """Replace (or append) the section `name` of the reliability report, keeping the other sections."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}\n"
    text = REPORT.read_text(encoding="utf-8") if REPORT.is_file() else ""
    rest = text.partition("<!-- ")[2]
    text = _TITLE + "\n" + _PREAMBLE + "\n" + (f"<!-- {rest}" if rest else "")  # the heading always current
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
