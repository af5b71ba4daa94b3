"""Uploaded datasets over their life: list, get, delete (with their token cache entries). Uploading is
`storage.dataset_uploads`; this side answers for what is stored and refuses to delete what a job still needs."""

from __future__ import annotations

import asyncio

import structlog

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.jobs.active import refuse_while_used
from finetune_server.settings import ServerSettings
from finetune_server.storage.job_store import JobStore
from finetune_server.storage.records import DatasetRecord
from finetune_server.training.data.token_cache import TokenCache

log = structlog.get_logger(__name__)

_DATASET_FIELDS = ("dataset", "eval_dataset")


def dataset_not_found(dataset_id: str) -> FinetuneError:
    return FinetuneError(
        ErrorKind.NOT_FOUND, "UPLOADED_DATASET_NOT_FOUND", f"no uploaded dataset has the id {dataset_id!r}"
    )


class DatasetService:
    def __init__(self, settings: ServerSettings, store: JobStore) -> None:
        self._settings = settings
        self._store = store

    async def get(self, dataset_id: str) -> DatasetRecord:
        try:
            return await asyncio.to_thread(self._store.get_dataset, dataset_id)
        except KeyError:
            raise dataset_not_found(dataset_id) from None

    async def list(self, *, page_size: int, page_token: str, owner: str | None) -> tuple[list[DatasetRecord], str]:
        if not 0 <= page_size <= 1000:
            raise FinetuneError(ErrorKind.INVALID_ARGUMENT, "INVALID_PAGE_SIZE", "page_size must be in 0..1000")
        try:
            return await asyncio.to_thread(
                lambda: self._store.list_datasets(page_size=page_size or 50, page_token=page_token, owner=owner)
            )
        except ValueError:
            raise FinetuneError(ErrorKind.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token is not valid") from None

    async def delete(self, record: DatasetRecord) -> tuple[int, int]:
        """Delete an upload: its file, then its record, then its unused token cache entries. Returns the bytes freed
        and how many cache entries went. FAILED_PRECONDITION while a queued or running job trains on it."""
        await refuse_while_used(
            self._store,
            lambda job: record.id in (job.config.get(name) for name in _DATASET_FIELDS),
            what=f"dataset {record.id}",
            reason="DATASET_IN_USE",
            how="used by",
        )
        path = self._settings.data_dir / record.path
        # The file first: a crash after it leaves a record whose retried delete finishes the job, never a file
        # nothing names any more.
        size = path.stat().st_size if path.is_file() else 0
        path.unlink(missing_ok=True)
        await asyncio.to_thread(self._store.delete_dataset, record.id)
        cache = TokenCache(self._settings.token_cache_dir)
        removed = await asyncio.to_thread(cache.remove_dataset, record.sha256)
        freed = size + sum(removed.values())
        log.info("dataset_removed", dataset_id=record.id, freed_bytes=freed, token_cache_entries=len(removed))
        return freed, len(removed)
