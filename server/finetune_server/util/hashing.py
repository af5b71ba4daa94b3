"""sha256 of files, read in chunks: artifacts, uploads and in-process exports all checksum the same way."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

CHUNK_BYTES = 1 << 20


def sha256_file(path: Path, on_chunk: Callable[[int], None] | None = None) -> str:
    """The hex sha256 of `path`; `on_chunk(n)` after each chunk of n bytes (for progress by bytes read)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return digest.hexdigest()


def sha256_file_cached(path: Path) -> str:
    """`sha256_file`, remembered while the file keeps its size and modification time (a validation names the same
    dataset and tokenizer files again and again; a real tokenizer.json is megabytes)."""
    stat = Path(path).stat()
    return _sha256_by_stamp(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_by_stamp(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: hash again when it changes
    return sha256_file(Path(path))
