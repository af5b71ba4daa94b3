"""Dataset uploads: size-limited, checksummed, checked record by record before they are accepted, stored once per
content and owner. JSONL, JSON and Parquet files are accepted; their bad records are reported with their numbers.

The file is streamed to a temporary name under the uploads folder, fsynced, checked, then renamed to `<id><ext>`;
the record is written last. A crash leaves at most a temporary file (removed at the next start) or a complete file
whose record a repeated upload writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.settings import ServerSettings
from finetune_server.storage import layout
from finetune_server.storage.job_store import JobStore
from finetune_server.storage.records import DatasetRecord
from finetune_server.training.config import DATA_FORMATS
from finetune_server.training.data import check_dataset
from finetune_server.util.paths import check_name
from finetune_server.util.stoppable import run_stoppable

ALLOWED_SUFFIXES = {".jsonl": ".jsonl", ".ndjson": ".jsonl", ".json": ".json", ".parquet": ".parquet"}


def upload_id(sha256: str, owner: str) -> str:
    """An upload's id: of its content alone without authentication (as ids always were), else of the owner and the
    content, so two tokens uploading the same file get two datasets and neither learns of the other's."""
    if not owner:
        return f"ds-{sha256[:16]}"
    digest = hashlib.sha256(owner.encode() + b"\0" + sha256.encode()).hexdigest()
    return f"ds-{digest[:16]}"


def remove_stale_uploads(settings: ServerSettings, *, older_than_s: float = 0.0) -> None:
    """Remove uploads a crash left half-written. With other servers on the data dir, only those untouched for
    `older_than_s` (an upload in progress on another server is written to continuously)."""
    cutoff = time.time() - older_than_s
    for stale in settings.uploads_dir.glob(f"{layout.UPLOAD_TEMP_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            if older_than_s <= 0 or stale.stat().st_mtime < cutoff:
                stale.unlink(missing_ok=True)


def _suffix(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    if suffix not in ALLOWED_SUFFIXES:
        raise FinetuneError(
            ErrorKind.INVALID_ARGUMENT,
            "UNSUPPORTED_FILE_TYPE",
            f"metadata.filename: {filename!r} must end in .jsonl, .ndjson, .json or .parquet",
        )
    return ALLOWED_SUFFIXES[suffix]


async def store_upload(
    settings: ServerSettings,
    store: JobStore,
    *,
    filename: str,
    data_format: str,
    expected_sha256: str,
    chunks: AsyncIterator[bytes],
    owner: str = "",
) -> tuple[DatasetRecord, bool]:
    check_name(filename, "metadata.filename")
    suffix = _suffix(filename)
    data_format = data_format or "auto"
    if data_format not in DATA_FORMATS:
        raise FinetuneError(
            ErrorKind.INVALID_ARGUMENT,
            "INVALID_VALUE",
            f"metadata.data_format must be one of {', '.join(DATA_FORMATS)}",
        )
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=layout.UPLOAD_TEMP_PREFIX, suffix=suffix, dir=settings.uploads_dir)
    temp = Path(temp_name)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise FinetuneError(
                        ErrorKind.RESOURCE_EXHAUSTED,
                        "UPLOAD_TOO_LARGE",
                        f"the upload exceeds the server's limit of {settings.max_upload_bytes} bytes",
                    )
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        sha256 = digest.hexdigest()
        if expected_sha256 and expected_sha256.lower() != sha256:
            raise FinetuneError(
                ErrorKind.DATA_LOSS,
                "CHECKSUM_MISMATCH",
                f"the received file has sha256 {sha256}, not the {expected_sha256} the metadata announced",
            )
        existing = await asyncio.to_thread(store.find_dataset_by_sha256, sha256, owner)
        if existing is not None:
            return existing, False
        report = await run_stoppable(  # stopped when the uploader goes: nothing of the upload is kept then
            lambda stop: check_dataset(temp, name=filename, field="dataset", data_format=data_format, should_stop=stop)
        )
        if report.violations:
            first = report.violations[0]
            raise FinetuneError(
                ErrorKind.INVALID_ARGUMENT,
                "INVALID_DATASET",
                f"the dataset has {report.num_invalid} bad examples; the first: {first.message}"
                if report.num_invalid
                else f"the dataset cannot be used: {first.message}",
                violations=report.violations,
            )
        dataset_id = upload_id(sha256, owner)
        final = settings.layout.uploaded_dataset(dataset_id, suffix)
        temp.replace(final)  # noqa: ASYNC240 - one rename
        report_fields = {k: v for k, v in asdict(report).items() if k != "token_stats"}
        record = DatasetRecord(
            id=dataset_id,
            filename=Path(filename).name,
            size_bytes=size,
            sha256=sha256,
            path=str(final.relative_to(settings.data_dir)),
            report=report_fields,
            create_time=time.time(),
            owner=owner,
        )
        return await asyncio.to_thread(store.put_dataset, record)
    finally:
        temp.unlink(missing_ok=True)  # noqa: ASYNC240 - one unlink
