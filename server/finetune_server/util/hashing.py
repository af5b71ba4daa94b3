"""sha256 of files, read in chunks: artifacts, uploads and in-process exports all checksum the same way."""

from __future__ import annotations

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
