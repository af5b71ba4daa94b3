"""The token cache's folder: what an entry's key is made of, who builds it, who may delete it, and when.

A dataset is rendered with the chat template and tokenized once per (data content, tokenizer, template, max_length,
data format, train_on_prompt, encoder version); every job, retry, resume and DDP rank with the same key reads the
same entry (`token_table.TokenTable`, memory-mapped). What writes an entry is `token_build`; this module only
coordinates, with the standard library (no pyarrow), so the server process can remove entries too.

Concurrency, across processes and without a daemon:
- Building: the builder holds an exclusive flock on `.lock-<key>` and writes into a `.staging-<key>-*` folder that
  is renamed into place when complete; a second process wanting the same key waits for the lock and then finds the
  entry. Any staging folder of a key whose lock is free belongs to a builder that died: it is removed.
- Using: whoever opens an entry holds a shared flock on its `last-used` marker (and touches it: the LRU order) for
  as long as the entry is open. Eviction takes the exclusive lock without waiting, so an entry in use is never
  removed; a lock is released by the kernel when its process dies, so a crashed job never pins an entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from finetune_server.storage.layout import TokenCacheDir, TokenCacheEntry
from finetune_server.training.data.sources import DatasetSource, as_source
from finetune_server.util.hashing import sha256_file_cached
from finetune_server.util.paths import folder_bytes

if TYPE_CHECKING:
    from finetune_server.training.config import TrainingConfig

log = structlog.get_logger(__name__)

# Bump whenever the encoder (training/data/encode.py) or the table's columns change what an entry holds: old
# entries then stop matching and age out of the cache.
ENCODER_VERSION = 1
_LOCK_POLL_S = 0.2  # how often a process waiting for another's build checks its own should_stop
# The files load_tokenizer reads: any change to them can change the tokens or the special ids.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json")


def dataset_fingerprint(source: DatasetSource | Path) -> str:
    """The content key of a dataset (DatasetSource.fingerprint: a file's sha256, a hub dataset's pinned commit...),
    so the same data under another name hits."""
    return as_source(source).fingerprint()


def tokenizer_fingerprint(model_dir: Path) -> str:
    """A hash of the model's tokenizer files (names and contents), so a retrained tokenizer never hits."""
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        path = model_dir / name
        digest.update(name.encode())
        digest.update(sha256_file_cached(path).encode() if path.is_file() else b"-")
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes the tokens of a dataset."""

    dataset: str  # dataset_fingerprint
    tokenizer: str  # tokenizer_fingerprint
    template: str  # sha256 of the chat template text
    max_length: int
    data_format: str
    train_on_prompt: bool
    encoder_version: int = ENCODER_VERSION

    @classmethod
    def of(
        cls,
        *,
        dataset: str,
        tokenizer: str,
        template: str,
        max_length: int,
        data_format: str,
        train_on_prompt: bool,
    ) -> CacheKey:
        """The key for a template given as text (it is hashed)."""
        return cls(
            dataset=dataset,
            tokenizer=tokenizer,
            template=hashlib.sha256(template.encode("utf-8")).hexdigest(),
            max_length=int(max_length),
            data_format=data_format,
            train_on_prompt=bool(train_on_prompt),
        )

    @property
    def digest(self) -> str:
        """The entry's folder name."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_key(source: DatasetSource | Path, config: TrainingConfig, model_dir: Path, template: str) -> CacheKey:
    """Everything that changes a dataset's tokens: its content, the tokenizer, the template and the encoder settings
    (a job's, and a validation's looking for the entry that job built)."""
    return CacheKey.of(
        dataset=dataset_fingerprint(source),
        tokenizer=tokenizer_fingerprint(model_dir),
        template=template,
        max_length=int(config.max_length or 2048),
        data_format=config.data_format or "auto",
        train_on_prompt=bool(config.train_on_prompt),
    )


class CacheStopped(Exception):  # noqa: N818 - a state, not an error
    """should_stop() turned True while waiting for, or building, an entry; nothing was left behind."""


@dataclass
class Lease:
    """An open entry: its marker's shared lock keeps eviction away until `release()` (or the process's end)."""

    entry: TokenCacheEntry
    _fd: int | None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class TokenCache:
    """The cache under one folder (`<data dir>/token-cache`), with its size cap (None: no cap)."""

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.dir = TokenCacheDir(Path(root))
        self.max_bytes = max_bytes

    @property
    def root(self) -> Path:
        return self.dir.root

    def lease(self, key: str) -> Lease | None:
        """The complete entry of `key`, leased (touched and share-locked); None when there is none."""
        entry = self.dir.entry(key)
        try:
            fd = os.open(entry.used_marker, os.O_RDWR)  # never O_CREAT: a missing marker means no entry
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an eviction removes this very entry
        if not (entry.tokens.is_file() and entry.meta.is_file()):  # it was evicted meanwhile
            os.close(fd)
            return None
        with contextlib.suppress(OSError):
            os.utime(fd)
        return Lease(entry, fd)

    @contextlib.contextmanager
    def building(self, key: str, should_stop: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold `key`'s build lock for the block, waiting for another builder; CacheStopped when told to stop."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir.build_lock(key), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if should_stop():
                        raise CacheStopped from None
                    time.sleep(_LOCK_POLL_S)
            for stale_key, folder in self.dir.staging():  # ours to clean: we hold the lock
                if stale_key == key:
                    shutil.rmtree(folder, ignore_errors=True)
            yield
        finally:
            os.close(fd)

    def new_staging(self, key: str) -> TokenCacheEntry:
        """An empty staging folder for `key` (call inside `building(key)`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return TokenCacheEntry(Path(tempfile.mkdtemp(dir=self.root, prefix=self.dir.staging_prefix(key))))

    def publish(self, staging: TokenCacheEntry, key: str) -> TokenCacheEntry:
        """Rename a complete staging folder into place (its marker is created here, last)."""
        staging.used_marker.touch()
        entry = self.dir.entry(key)
        try:
            staging.root.rename(entry.root)
        except OSError:  # an entry appeared meanwhile (a builder that did not see our lock file): keep that one
            shutil.rmtree(staging.root, ignore_errors=True)
            if not entry.used_marker.is_file():
                raise
        return entry

    def evict(self) -> list[str]:
        """Remove least-recently-used entries until the cache fits its cap, and dead builders' staging folders.

        Entries in use (leased by any process, this one included) are never removed. Returns the removed keys.
        """
        self._remove_abandoned_staging()
        if self.max_bytes is None:
            return []
        sized = [(entry, folder_bytes(entry.root), _last_used(entry)) for entry in self.dir.entries()]
        total = sum(size for _, size, _ in sized)
        removed = []
        for entry, size, _ in sorted(sized, key=lambda item: item[2]):
            if total <= self.max_bytes:
                break
            if self._remove_if_unused(entry):
                total -= size
                removed.append(entry.key)
        if removed:
            log.info("token cache evicted", removed=removed, cache_bytes=total, max_bytes=self.max_bytes)
        return removed

    def remove_dataset(self, fingerprint: str) -> dict[str, int]:
        """Remove the entries built from the data with this content fingerprint (its dataset was deleted).

        Entries in use are kept (their jobs still read them); the size cap removes them later. Returns the removed
        entries' keys with the bytes each freed.
        """
        removed = {}
        for entry in self.dir.entries():
            if read_meta(entry).get("key", {}).get("dataset") != fingerprint:
                continue
            size = folder_bytes(entry.root)
            if self._remove_if_unused(entry):
                removed[entry.key] = size
        return removed

    def total_bytes(self) -> int:
        return sum(folder_bytes(entry.root) for entry in self.dir.entries())

    def _remove_if_unused(self, entry: TokenCacheEntry) -> bool:
        try:
            fd = os.open(entry.used_marker, os.O_RDWR)
        except OSError:
            return False  # gone already, or not complete
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # in use
            # Renamed away first, so no reader ever sees half of a removed entry.
            doomed = Path(tempfile.mkdtemp(dir=self.root, prefix=self.dir.staging_prefix(entry.key)))
            entry.root.replace(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            self.dir.build_lock(entry.key).unlink(missing_ok=True)  # a racing second build is harmless (publish)
            return True
        finally:
            os.close(fd)

    def _remove_abandoned_staging(self) -> None:
        for key, folder in self.dir.staging():
            fd = os.open(self.dir.build_lock(key), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being built right now
            finally:
                os.close(fd)
            shutil.rmtree(folder, ignore_errors=True)


def write_meta(entry: TokenCacheEntry, meta: dict[str, Any]) -> None:
    entry.meta.write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")


def read_meta(entry: TokenCacheEntry) -> dict[str, Any]:
    try:
        value = json.loads(entry.meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _last_used(entry: TokenCacheEntry) -> float:
    try:
        return entry.used_marker.stat().st_mtime
    except OSError:
        return 0.0
