"""A token cache entry's table: written a record batch at a time, read memory-mapped, a row at a time.

The table is an Arrow IPC stream (the format of `datasets`' own cache files, so `datasets.Dataset.from_file` reads
it too) with one row per trainable example: `input_ids` and `labels` (int32 lists, after truncation), `length`
(tokens trained on), `trainable` (labels the loss counts, after the causal shift), `num_tokens` (before truncation)
and `row` (the example's line or row in the source). Opening it maps the file: only the small per-example columns
are read into memory (as numpy arrays); a batch's token ids are copied out when it is collated, and the pages the
kernel maps in are file-backed, so memory does not grow with the row count.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from finetune_server.storage.layout import TokenCacheEntry
from finetune_server.training.data.batch_encode import EncodedBatch
from finetune_server.training.data.token_cache import Lease

SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("length", pa.int32()),
        ("trainable", pa.int32()),
        ("num_tokens", pa.int32()),
        ("row", pa.int64()),
    ]
)


def record_batch(batch: EncodedBatch) -> pa.RecordBatch:
    offsets = pa.array(batch.offsets.astype(np.int32))  # a batch holds far fewer than 2**31 tokens
    return pa.RecordBatch.from_arrays(
        [
            pa.ListArray.from_arrays(offsets, pa.array(batch.ids, type=pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(batch.labels, type=pa.int32())),
            pa.array(np.diff(batch.offsets).astype(np.int32)),
            pa.array(batch.trainable, type=pa.int32()),
            pa.array(batch.num_tokens, type=pa.int32()),
            pa.array(batch.rows, type=pa.int64()),
        ],
        schema=SCHEMA,
    )


class TableWriter:
    """Appends EncodedBatches to a staging entry's table file."""

    def __init__(self, path: Path) -> None:
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, SCHEMA)

    def write(self, batch: EncodedBatch) -> None:
        if len(batch):
            self._writer.write_batch(record_batch(batch))

    def close(self) -> None:
        try:
            self._writer.close()
        finally:
            self._sink.close()


@dataclass(frozen=True)
class TokenRow:
    """One example's token ids and labels, copied out of the map as int64 (what the model takes)."""

    input_ids: np.ndarray
    labels: np.ndarray


class _Chunk:
    """One record batch: numpy views of its offsets and values (zero-copy over the mapped file)."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        ids, labels = batch.column(0), batch.column(1)
        self.offsets = ids.offsets.to_numpy(zero_copy_only=True)
        self.ids = ids.values.to_numpy(zero_copy_only=True)
        self.labels = labels.values.to_numpy(zero_copy_only=True)

    def row(self, local: int) -> TokenRow:
        start, end = int(self.offsets[local]), int(self.offsets[local + 1])
        return TokenRow(self.ids[start:end].astype(np.int64), self.labels[start:end].astype(np.int64))


class TokenTable:
    """The examples of one entry (or a subset of them, see `take`), indexed 0..len-1.

    `lengths` and `trainable` are read once (int32, one value per example: what planning and loss weighting need);
    `column(name)` reads another per-example column; `rows(indices)` copies out only those examples' tokens.
    """

    def __init__(
        self, batches: list[pa.RecordBatch], index: np.ndarray | None, lengths: np.ndarray, trainable: np.ndarray
    ) -> None:
        self._batches = batches
        self._chunks = [_Chunk(b) for b in batches]
        self._starts = [0]
        for batch in batches:
            self._starts.append(self._starts[-1] + batch.num_rows)
        self._index = index  # positions in the entry; None: all of them, in order
        self.lengths = lengths
        self.trainable = trainable
        self._lease: Lease | None = None

    @classmethod
    def open(cls, entry: TokenCacheEntry, lease: Lease | None = None) -> TokenTable:
        """Map the entry's table; `lease` (the entry's shared lock) is released by `close()`."""
        source = pa.memory_map(str(entry.tokens), "r")
        batches = pa.ipc.open_stream(source).read_all().to_batches()  # zero-copy: buffers point into the map
        opened = cls(batches, None, _concat(batches, "length"), _concat(batches, "trainable"))
        opened._lease = lease
        return opened

    def __len__(self) -> int:
        return len(self.lengths)

    def column(self, name: str) -> np.ndarray:
        """A per-example column (`num_tokens`, `row`, ...) for the examples of this table, in its order."""
        values = _concat(self._batches, name)
        return values if self._index is None else values[self._index]

    def take(self, indices: np.ndarray | Sequence[int]) -> TokenTable:
        """The examples at `indices`, in that order (a view: nothing is copied but the per-example columns)."""
        positions = np.asarray(indices, dtype=np.int64)
        base = positions if self._index is None else self._index[positions]
        view = TokenTable(self._batches, base, self.lengths[positions], self.trainable[positions])
        view._lease = self._lease  # one lease for the entry: whichever view closes first releases it
        return view

    def row(self, i: int) -> TokenRow:
        position = int(i) if self._index is None else int(self._index[i])
        chunk = bisect.bisect_right(self._starts, position) - 1
        return self._chunks[chunk].row(position - self._starts[chunk])

    def rows(self, indices: Sequence[int]) -> list[TokenRow]:
        return [self.row(i) for i in indices]

    def close(self) -> None:
        """Give up the entry's lease (the map itself goes with the last reference)."""
        if self._lease is not None:
            self._lease.release()
            self._lease = None


def _concat(batches: list[pa.RecordBatch], name: str) -> np.ndarray:
    if not batches:
        return np.zeros(0, dtype=SCHEMA.field(name).type.to_pandas_dtype())
    return np.concatenate([batch.column(name).to_numpy() for batch in batches])


def empty_table() -> TokenTable:
    return TokenTable([], None, np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32))
