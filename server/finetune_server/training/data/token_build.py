"""Opening a dataset's token cache entry, or building it: encode once, in parallel, into a staging folder.

`open_or_build` is what training calls: a hit opens the entry without reading the dataset; a miss takes the key's
build lock (a second process waiting for the same key then hits), encodes the examples a batch at a time, writes
each batch to the staging folder's table, and renames the folder into place once the table and its meta are
complete. Any failure, a stop request or a full disk leaves no entry and no staging folder behind. After a build, the
cache is trimmed to its size cap.

Parallelism: the template rendering and labelling are Python, so several processes (`encoding_processes`) each
encode whole batches with one tokenizer thread; the batches come back in order and only a few are in flight, so
memory stays flat. Small datasets are encoded in this process, where starting processes would cost more than they
save.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import structlog

from finetune_server.storage.layout import TokenCacheEntry
from finetune_server.training.data.batch_encode import MAX_UNUSABLE_ROWS, BatchResult, EncoderSettings, encode_batch
from finetune_server.training.data.encoding_processes import encode_in_processes
from finetune_server.training.data.formats import Example
from finetune_server.training.data.token_cache import CacheKey, CacheStopped, TokenCache, read_meta, write_meta
from finetune_server.training.data.token_table import TableWriter, TokenTable

log = structlog.get_logger(__name__)

BATCH_ROWS = 1024  # examples per encoded batch (and per record batch of the table)
MIN_BATCHES_FOR_PROCESSES = 4  # fewer batches than this are encoded in this process

ProgressCallback = Callable[[float | None, int], None]  # (fraction done or None when the total is unknown, rows)


@dataclass
class CacheOpen:
    """An opened entry: its table (close it when done), its meta, and whether this call built it."""

    table: TokenTable
    meta: dict[str, Any]
    built: bool
    seconds: float  # the build's wall time (0 for a hit)

    @property
    def key(self) -> str:
        return str(self.meta.get("digest", ""))


@dataclass
class _Counts:
    """What a build accumulates besides the table: written to meta.json."""

    rows_read: int = 0
    examples: int = 0
    template_errors: int = 0
    truncated: int = 0
    unusable: int = 0
    over_max_length: int = 0
    trained_tokens: int = 0
    unusable_rows: list[int] = field(default_factory=list)
    num_tokens: list[np.ndarray] = field(default_factory=list)

    def add(self, result: BatchResult) -> None:
        self.rows_read += result.rows_read
        self.examples += len(result.batch)
        self.template_errors += result.template_errors
        self.truncated += result.truncated
        self.unusable += result.unusable
        self.over_max_length += result.over_max_length
        self.trained_tokens += int(result.batch.offsets[-1])
        self.unusable_rows.extend(result.unusable_rows[: MAX_UNUSABLE_ROWS - len(self.unusable_rows)])
        self.num_tokens.append(result.all_num_tokens)

    def to_dict(self) -> dict[str, Any]:
        lengths = np.concatenate(self.num_tokens) if self.num_tokens else np.zeros(0, dtype=np.int32)
        return {
            "rows_read": self.rows_read,
            "examples": self.examples,
            "template_errors": self.template_errors,
            "truncated": self.truncated,
            "unusable": self.unusable,
            "over_max_length": self.over_max_length,
            "trained_tokens": self.trained_tokens,
            "unusable_rows": self.unusable_rows,
            "token_stats": length_stats(lengths),
        }


def length_stats(lengths: np.ndarray) -> dict[str, float] | None:
    """min, max, mean, p50, p95 (nearest rank, as validation's TokenStats) and total of the token lengths."""
    if not len(lengths):
        return None
    ordered = np.sort(lengths.astype(np.int64))

    def nearest_rank(fraction: float) -> int:
        return int(ordered[max(0, math.ceil(fraction * len(ordered)) - 1)])

    total = int(ordered.sum())
    return {
        "min": int(ordered[0]),
        "max": int(ordered[-1]),
        "mean": total / len(ordered),
        "p50": nearest_rank(0.5),
        "p95": nearest_rank(0.95),
        "total": total,
    }


def open_or_build(
    cache: TokenCache,
    key: CacheKey,
    examples: Callable[[], Iterable[tuple[int, Example]]],
    settings: EncoderSettings,
    *,
    processes: int = 1,
    total_rows: Callable[[], int | None] = lambda: None,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> CacheOpen:
    """The entry of `key`, opened; built from `examples()` (called only on a miss) when there is none.

    `total_rows()` (also only on a miss) estimates the row count, for the progress fraction.

    Raises CacheStopped when `should_stop()` turns True, and whatever reading or writing raised (a full disk's
    OSError included); in every case nothing half-written is left.
    """
    digest = key.digest
    lease = cache.lease(digest)
    if lease is not None:
        return CacheOpen(TokenTable.open(lease.entry, lease), read_meta(lease.entry), built=False, seconds=0.0)
    with cache.building(digest, should_stop):
        lease = cache.lease(digest)  # another process built it while we waited
        if lease is not None:
            return CacheOpen(TokenTable.open(lease.entry, lease), read_meta(lease.entry), built=False, seconds=0.0)
        started = time.perf_counter()
        staging = cache.new_staging(digest)
        try:
            counts = _write_table(staging, examples(), settings, processes, total_rows(), on_progress, should_stop)
            seconds = time.perf_counter() - started
            meta = {"digest": digest, "key": key.to_dict(), "build_seconds": seconds, "processes": processes}
            write_meta(staging, {**meta, **counts.to_dict()})
            entry = cache.publish(staging, digest)
        except BaseException:
            shutil.rmtree(staging.root, ignore_errors=True)
            raise
        lease = cache.lease(digest)
    if lease is None:  # evicted between publish and lease: only a cap smaller than one entry does that
        raise RuntimeError(f"the token cache entry {digest} vanished as soon as it was built")
    cache.evict()  # after leasing, so the new entry is in use and stays
    log.info("token cache built", key=digest, rows=counts.rows_read, examples=counts.examples, seconds=seconds)
    return CacheOpen(TokenTable.open(entry, lease), read_meta(entry), built=True, seconds=seconds)


def _write_table(
    staging: TokenCacheEntry,
    examples: Iterable[tuple[int, Example]],
    settings: EncoderSettings,
    processes: int,
    total_rows: int | None,
    on_progress: ProgressCallback | None,
    should_stop: Callable[[], bool],
) -> _Counts:
    counts = _Counts()
    writer = TableWriter(staging.tokens)
    try:
        for result in encoded_batches(examples, settings, processes=processes, should_stop=should_stop):
            writer.write(result.batch)
            counts.add(result)
            if on_progress is not None:
                fraction = min(1.0, counts.rows_read / total_rows) if total_rows else None
                on_progress(fraction, counts.rows_read)
    finally:
        writer.close()
    return counts


def encoded_batches(
    examples: Iterable[tuple[int, Example]],
    settings: EncoderSettings,
    *,
    processes: int = 1,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[BatchResult]:
    """The examples encoded, a batch of BATCH_ROWS at a time and in order; CacheStopped between batches on a stop."""
    batches = _batches(examples)
    head = list(islice(batches, MIN_BATCHES_FOR_PROCESSES))
    if processes <= 1 or len(head) < MIN_BATCHES_FOR_PROCESSES:
        for items in _chain(head, batches):
            if should_stop():
                raise CacheStopped
            yield encode_batch(items, settings)
        return
    yield from encode_in_processes(_chain(head, batches), settings, processes, should_stop)


def _batches(examples: Iterable[tuple[int, Example]]) -> Iterator[list[tuple[int, Example]]]:
    iterator = iter(examples)
    while batch := list(islice(iterator, BATCH_ROWS)):
        yield batch


def _chain(
    head: list[list[tuple[int, Example]]], rest: Iterator[list[tuple[int, Example]]]
) -> Iterator[list[tuple[int, Example]]]:
    yield from head
    yield from rest
