"""Reading dataset files into raw records, one per line (JSONL) or per array element (JSON).

JSONL is streamed line by line as bytes, so a file larger than memory is fine and one bad line (invalid UTF-8,
invalid JSON, not an object) is reported with its number instead of failing the whole file. A JSON array file is
parsed whole (the standard library has no streaming parser); its element numbers stand in for line numbers. A
`.json` file whose first non-blank character is `{` is read as JSONL, as Hugging Face `datasets` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSONL = "jsonl"
JSON = "json"
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_SNIFF_BYTES = 4096
_BLANK = b" \t\r\n\xef\xbb\xbf"  # whitespace and the UTF-8 byte-order mark


@dataclass(frozen=True)
class RawRecord:
    """One line (or array element) of a dataset: its 1-based number, and either a value or why it has none.

    `line == 0` marks a problem with the file as a whole (e.g. a JSON file that is not an array).
    """

    line: int
    value: Any | None
    error: str | None = None
    reason: str | None = None  # INVALID_UTF8, INVALID_JSON, NOT_AN_OBJECT; NOT_AN_ARRAY (line 0 only)


def detect_file_format(path: Path) -> str:
    """`jsonl` or `json` (an array), by extension for .jsonl/.ndjson, else by the first non-blank byte."""
    if path.suffix.lower() in _JSONL_SUFFIXES:
        return JSONL
    with path.open("rb") as handle:
        while chunk := handle.read(_SNIFF_BYTES):
            stripped = chunk.lstrip(_BLANK)
            if stripped[:1] in (b"[", b"{"):
                return JSON if stripped[:1] == b"[" else JSONL
            if stripped:
                break
    return JSON if path.suffix.lower() == ".json" else JSONL


def json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _as_record(number: int, value: Any) -> RawRecord:
    if isinstance(value, dict):
        return RawRecord(number, value)
    return RawRecord(number, None, f"expected a JSON object, got {json_type_name(value)}", "NOT_AN_OBJECT")


def _decode_line(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 at byte {exc.start + 1} of the line"


MAX_NESTING = 64  # no dataset row needs more; deeper JSON would exhaust the recursion of whatever walks it next


class _UnusableJsonError(Exception):
    """Why a JSON text cannot become records: the message and the violation reason."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message, self.reason = message, reason


def _parse_json(text: str, position: Callable[[json.JSONDecodeError], str]) -> Any:
    """The parsed value; _UnusableJsonError for bad JSON, or for nesting deep enough to break what walks it next."""
    too_deep = _UnusableJsonError(f"JSON nested deeper than {MAX_NESTING} levels", "TOO_DEEP")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _UnusableJsonError(f"invalid JSON: {exc.msg} at {position(exc)}", "INVALID_JSON") from None
    except RecursionError:  # the parser itself gave up
        raise too_deep from None
    if _nested_deeper_than(value, MAX_NESTING):
        raise too_deep
    return value


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Without recursion: the value may be as deep as the parser allowed."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            raw = (line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line).strip()
            if not raw:
                continue
            text, error = _decode_line(raw)
            if text is None:
                yield RawRecord(number, None, error, "INVALID_UTF8")
                continue
            try:
                value = _parse_json(text, lambda exc: f"column {exc.colno}")
            except _UnusableJsonError as unusable:
                yield RawRecord(number, None, unusable.message, unusable.reason)
                continue
            yield _as_record(number, value)


def _iter_json_array(path: Path) -> Iterator[RawRecord]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        yield RawRecord(0, None, f"invalid UTF-8 at byte {exc.start + 1} of the file", "INVALID_UTF8")
        return
    if not text.strip():
        return
    try:
        value = _parse_json(text, lambda exc: f"line {exc.lineno} column {exc.colno}")
    except _UnusableJsonError as unusable:
        yield RawRecord(0, None, unusable.message, unusable.reason)
        return
    if not isinstance(value, list):
        yield RawRecord(
            0, None, f"a .json dataset must be an array of objects, got {json_type_name(value)}", "NOT_AN_ARRAY"
        )
        return
    for number, element in enumerate(value, start=1):
        yield _as_record(number, element)


def iter_records(path: Path) -> Iterator[RawRecord]:
    """Yield every record of a dataset file in order; blank JSONL lines are skipped but still counted."""
    if detect_file_format(path) == JSONL:
        yield from _iter_jsonl(path)
    else:
        yield from _iter_json_array(path)
