"""Labels on jobs: bounded key/value pairs a caller sets at Train and filters ListJobs by.

Keys are lower-case so `Team` and `team` cannot both exist; values take either case. Everything is checked at once,
so one answer names every bad label.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from finetune_server.errors import ErrorKind, FinetuneError, ViolationList

MAX_LABELS = 32
MAX_LABEL_CHARS = 63
_KEY = re.compile(rf"[a-z][a-z0-9_.-]{{0,{MAX_LABEL_CHARS - 1}}}")
_VALUE = re.compile(rf"[A-Za-z0-9_.-]{{0,{MAX_LABEL_CHARS}}}")
_SHOWN_CHARS = 40  # of a bad key or value in a message: enough to spot it, never a megabyte echoed back


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


def check_labels(labels: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    """The labels as a dict, or INVALID_ARGUMENT naming `field` with one violation per problem."""
    problems = ViolationList()
    if len(labels) > MAX_LABELS:
        problems.add(field, "TOO_MANY_LABELS", f"{len(labels)} labels; at most {MAX_LABELS} are allowed")
    for key, value in sorted(labels.items()):
        if not _KEY.fullmatch(key):
            problems.add(
                field,
                "INVALID_LABEL_KEY",
                f"key {_shown(key)}: must be 1 to {MAX_LABEL_CHARS} characters of a-z, 0-9, '_', '-' and '.',"
                " starting with a letter",
            )
        if not _VALUE.fullmatch(value):
            problems.add(
                field,
                "INVALID_LABEL_VALUE",
                f"value {_shown(value)} of {_shown(key)}: must be at most {MAX_LABEL_CHARS} characters of letters,"
                " digits, '_', '-' and '.'",
            )
    if problems:
        first = problems.items[0]
        message = "; ".join(v.message for v in problems.items)
        raise FinetuneError(ErrorKind.INVALID_ARGUMENT, first.reason, f"{field}: {message}", violations=problems.items)
    return dict(labels)
