"""Tables as numbered raw records: Parquet, CSV and Arrow files (pyarrow), save_to_disk folders and hub datasets
(`datasets`), read a batch of rows at a time; only the batch at hand becomes Python values.

Rows are numbered from 1 in the order they are stored. A file that cannot be read as its format (a `.parquet` that is
not Parquet, a CSV that does not parse) is one `line == 0` record with the reason, as `records.py` reports a JSON
file that is not an array. CSV cells are read as text, never as numbers (a `42` answer stays the string "42"), and a
CSV row with the wrong number of cells is reported with its number while the rows around it are read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from finetune_server.training.data.formats import column_layout_problem
from finetune_server.training.data.records import RawRecord
from finetune_server.training.data.sources import ARROW, CSV, HUB, PARQUET, SAVED, DatasetSource

if TYPE_CHECKING:
    import pyarrow as pa

BATCH_ROWS = 1024


class _UnreadableError(Exception):
    """The source as a whole cannot be read: the message and the violation reason."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message, self.reason = message, reason


def _arrow_errors() -> tuple[type[Exception], ...]:
    import pyarrow as pa

    return (pa.ArrowException, OSError, ValueError)


# ----------------------------------------------------------------------------------------------------- the readers


def _parquet_batches(source: DatasetSource) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path, memory_map=True)
    except _arrow_errors() as exc:
        raise _UnreadableError(f"not a Parquet file ({exc})", "NOT_PARQUET") from exc
    try:
        yield from parquet.iter_batches(batch_size=BATCH_ROWS)
    except _arrow_errors() as exc:
        raise _UnreadableError(f"the Parquet file is damaged: {exc}", "INVALID_PARQUET") from exc
    finally:
        parquet.close()


def _arrow_batches(source: DatasetSource) -> Iterator[pa.RecordBatch]:
    """An Arrow IPC file (Feather v2) or stream (what datasets writes), memory-mapped."""
    import pyarrow as pa

    with pa.memory_map(str(source.path)) as mapped:
        reader: Any
        try:
            reader = pa.ipc.open_file(mapped)
            batches: Iterable[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            mapped.seek(0)
            try:
                reader = pa.ipc.open_stream(mapped)
            except _arrow_errors() as exc:
                raise _UnreadableError(f"not an Arrow file or stream ({exc})", "NOT_ARROW") from exc
            batches = reader
        try:
            yield from batches
        except _arrow_errors() as exc:
            raise _UnreadableError(f"the Arrow data is damaged: {exc}", "INVALID_ARROW") from exc


def _datasets_batches(source: DatasetSource) -> Iterator[pa.Table]:
    """A save_to_disk folder (memory-mapped) or a hub snapshot (streamed from its files), through `datasets`."""
    import datasets

    try:
        if source.kind == SAVED:
            loaded = datasets.load_from_disk(str(source.path))
            dataset = loaded[source.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(
                str(source.path), name=source.subset or None, split=source.split, streaming=True
            )
        yield from dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)
    except Exception as exc:  # datasets reading the caller's files: their problem, never an internal error
        what = "a save_to_disk folder" if source.kind == SAVED else "the hub dataset's files"
        raise _UnreadableError(f"{what} could not be read: {exc}", "UNREADABLE_DATASET") from exc


_BatchReader = Callable[[DatasetSource], Iterator[Any]]
_READERS: dict[str, _BatchReader] = {
    PARQUET: _parquet_batches,
    ARROW: _arrow_batches,
    SAVED: _datasets_batches,
    HUB: _datasets_batches,
}


# ----------------------------------------------------------------------------------------------------- rows


def _binary_columns(schema: pa.Schema) -> list[str]:
    import pyarrow as pa

    return [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]


def _row(number: int, value: dict[str, Any], binary: list[str]) -> RawRecord:
    """A row as a record; binary cells (CSV reads every cell so) become text, or the row is INVALID_UTF8."""
    for column in binary:
        cell = value.get(column)
        if isinstance(cell, bytes):
            try:
                value[column] = cell.decode("utf-8")
            except UnicodeDecodeError as exc:
                return RawRecord(
                    number, None, f"column {column!r} is not UTF-8 text (byte {exc.start + 1})", "INVALID_UTF8"
                )
    return RawRecord(number, value)


def _slices(batch: Any) -> Iterator[Any]:
    """A batch in slices of at most BATCH_ROWS rows: an Arrow file may hold one batch of millions."""
    for offset in range(0, batch.num_rows, BATCH_ROWS):
        yield batch.slice(offset, BATCH_ROWS)


def _numbered_rows(batches: Iterator[Any], data_format: str) -> Iterator[RawRecord]:
    number = 0
    first = True
    binary: list[str] = []
    for batch in batches:
        if first:
            first = False
            problem = column_layout_problem(list(batch.schema.names), data_format)
            if problem is not None:
                yield RawRecord(0, None, problem, "UNKNOWN_COLUMNS")
                return
            binary = _binary_columns(batch.schema)
        for piece in _slices(batch):
            for value in piece.to_pylist():
                number += 1
                yield _row(number, value, binary)


def _csv_records(source: DatasetSource, data_format: str) -> Iterator[RawRecord]:
    """CSV (TSV by extension), every cell as text; a row with the wrong number of cells is reported, not fatal."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    path = source.path
    if path.stat().st_size == 0:
        return
    bad: list[tuple[int, str]] = []  # (data row number, message), in file order

    def on_invalid_row(row: Any) -> str:
        # row.number counts the header as row 1; None when pyarrow does not know it (then it goes last)
        number = row.number - 1 if row.number is not None else 1 << 62
        bad.append((number, f"expected {row.expected_columns} cells like the header, got {row.actual_columns}"))
        return "skip"

    parse = pcsv.ParseOptions(
        delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
        newlines_in_values=True,
        invalid_row_handler=on_invalid_row,
    )
    read = pcsv.ReadOptions(use_threads=False)
    try:
        header = pcsv.open_csv(path, read_options=read, parse_options=parse).schema.names
        bad.clear()  # rows the header read saw are seen again below
        text = pcsv.ConvertOptions(column_types=dict.fromkeys(header, pa.binary()))
        reader = pcsv.open_csv(path, read_options=read, parse_options=parse, convert_options=text)
    except _arrow_errors() as exc:
        raise _UnreadableError(f"not a readable CSV file ({exc})", "INVALID_CSV") from exc
    problem = column_layout_problem(list(header), data_format)
    if problem is not None:
        yield RawRecord(0, None, problem, "UNKNOWN_COLUMNS")
        return
    number = 0

    def bad_rows(*, to_the_end: bool = False) -> Iterator[RawRecord]:
        """The reported bad rows that come before the next good row (or all that are left)."""
        nonlocal number
        bad.sort()
        while bad and (to_the_end or bad[0][0] <= number + 1):
            number += 1
            yield RawRecord(number, None, bad.pop(0)[1], "BAD_ROW")

    try:
        for batch in reader:
            for value in batch.to_pylist():
                yield from bad_rows()
                number += 1
                yield _row(number, value, list(header))
    except _arrow_errors() as exc:
        raise _UnreadableError(f"the CSV file does not parse after row {number}: {exc}", "INVALID_CSV") from exc
    yield from bad_rows(to_the_end=True)


def iter_table_records(source: DatasetSource, data_format: str) -> Iterator[RawRecord]:
    """The rows of a table source as records (see the module docstring)."""
    try:
        if source.file_format == CSV:
            yield from _csv_records(source, data_format)
        else:
            yield from _numbered_rows(_READERS[source.file_format](source), data_format)
    except _UnreadableError as unreadable:
        yield RawRecord(0, None, unreadable.message, unreadable.reason)
    except _arrow_errors() as exc:  # a value pyarrow cannot make a Python one of (a date out of range, ...)
        yield RawRecord(0, None, f"a value cannot be read: {exc}", "UNREADABLE_VALUE")
