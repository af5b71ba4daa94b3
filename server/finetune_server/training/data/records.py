"""Reading dataset files into raw records, one per line (JSONL) or per array element (JSON).

JSONL is streamed line by line as bytes, so a file larger than memory is fine and one bad line (invalid UTF-8,
invalid JSON, not an object) is reported with its number instead of failing the whole file. A JSON array file is
streamed too, an element at a time; its element numbers stand in for line numbers. A
`.json` file whose first non-blank character is `{` is read as JSONL, as Hugging Face `datasets` does.
"""

from __future__ import annotations

import codecs
import json
import re
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


_CHUNK_CHARS = 1 << 20  # a JSON array is read this much at a time: memory holds one element and one chunk
_NON_BLANK = re.compile(r"[^ \t\n\r]")  # JSON's whitespace is these four


class _ArrayReader:
    """A JSON array file's text, a chunk at a time; what is before `mark` is done with and dropped at the next read.

    `line` and `column` (1-based) say where `mark` is in the file, so errors point into it.
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self._bytes_read = 0
        self.text = ""
        self.pos = 0  # where reading goes on
        self.mark = 0
        self.eof = False
        self.line, self.column = 1, 1

    def more(self) -> bool:
        """Append the next chunk; False at the end of the file. UnicodeDecodeError carries the file's byte offset."""
        if self.eof:
            return False
        raw = self._handle.read(_CHUNK_CHARS)
        try:
            decoded = self._decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            exc.start += self._bytes_read
            raise
        self._bytes_read += len(raw)
        self.eof = not raw
        self.text = self.text[self.mark :] + decoded
        self.pos -= self.mark
        self.mark = 0
        return True

    def skip_blank(self) -> str:
        """The next non-blank character ('' at the end of the file), reading on as needed; not consumed."""
        while True:
            found = _NON_BLANK.search(self.text, self.pos)
            if found is not None:
                self.pos = found.start()
                return self.text[self.pos]
            self.pos = len(self.text)
            if not self.more():
                return ""

    def consume(self, end: int) -> None:
        """Done with the text before `end`: move the mark there, keeping track of its line and column."""
        self.line, self.column = self._position(end)
        self.mark = self.pos = end

    def where(self, offset: int) -> str:
        """`line L column C` of an offset into the text."""
        line, column = self._position(offset)
        return f"line {line} column {column}"

    def _position(self, offset: int) -> tuple[int, int]:
        newlines = self.text.count("\n", self.mark, offset)
        if not newlines:
            return self.line, self.column + offset - self.mark
        return self.line + newlines, offset - self.text.rfind("\n", self.mark, offset)


def _iter_json_array(path: Path) -> Iterator[RawRecord]:
    """The elements of a JSON array, decoded one at a time (json's raw_decode on a growing buffer): a file larger
    than memory is fine. A file that breaks off or is not JSON past some element yields the elements before the
    break, then one line-0 record saying where it broke."""
    with path.open("rb") as handle:
        reader = _ArrayReader(handle)
        try:
            yield from _array_elements(reader)
        except UnicodeDecodeError as exc:
            yield RawRecord(0, None, f"invalid UTF-8 at byte {exc.start + 1} of the file", "INVALID_UTF8")
        except _UnusableJsonError as unusable:
            yield RawRecord(0, None, unusable.message, unusable.reason)


def _array_elements(reader: _ArrayReader) -> Iterator[RawRecord]:
    first = reader.skip_blank()
    if not first:
        return
    if first != "[":  # not an array: whatever it is, say what (such a file is small or broken anyway)
        while reader.more():
            pass
        value = _parse_json(reader.text, lambda exc: f"line {exc.lineno} column {exc.colno}")
        raise _UnusableJsonError(
            f"a .json dataset must be an array of objects, got {json_type_name(value)}", "NOT_AN_ARRAY"
        )
    reader.consume(reader.pos + 1)
    decoder = json.JSONDecoder()
    number = 0
    while True:
        head = reader.skip_blank()
        if number == 0 and head == "]":
            break
        value, end = _decode_element(reader, decoder)
        number += 1
        yield _as_record(number, value)
        reader.consume(end)
        separator = reader.skip_blank()
        if separator == "]":
            break
        if separator != ",":
            found = f"found {separator!r}" if separator else "the file ends"
            raise _UnusableJsonError(
                f"invalid JSON: expected ',' or ']' after element {number} at {reader.where(reader.pos)}, {found}",
                "INVALID_JSON",
            )
        reader.consume(reader.pos + 1)
    reader.consume(reader.pos + 1)
    if reader.skip_blank():
        raise _UnusableJsonError(f"invalid JSON: extra data at {reader.where(reader.pos)}", "INVALID_JSON")


def _decode_element(reader: _ArrayReader, decoder: json.JSONDecoder) -> tuple[Any, int]:
    """The element at the reader's position and where it ends; an element cut by the chunk's end reads on."""
    while True:
        try:
            value, end = decoder.raw_decode(reader.text, reader.pos)
        except json.JSONDecodeError as exc:
            if reader.more():
                continue
            raise _UnusableJsonError(f"invalid JSON: {exc.msg} at {reader.where(exc.pos)}", "INVALID_JSON") from None
        except RecursionError:
            raise _UnusableJsonError(f"JSON nested deeper than {MAX_NESTING} levels", "TOO_DEEP") from None
        if end == len(reader.text) and not reader.eof and isinstance(value, int | float):
            reader.more()  # a number may go on in the next chunk
            continue
        if _nested_deeper_than(value, MAX_NESTING):
            raise _UnusableJsonError(f"JSON nested deeper than {MAX_NESTING} levels", "TOO_DEEP")
        return value, end


def iter_records(path: Path) -> Iterator[RawRecord]:
    """Yield every record of a dataset file in order; blank JSONL lines are skipped but still counted."""
    if detect_file_format(path) == JSONL:
        yield from _iter_jsonl(path)
    else:
        yield from _iter_json_array(path)
