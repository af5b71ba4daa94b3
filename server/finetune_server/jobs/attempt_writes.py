"""The store writes of one running attempt, kept in order through a store outage.

A worker keeps training while the job store is unreachable (a database restart, a network cut): what it reports
queues here, in the order it came, and is written once the store answers again, so nothing is lost and the job's
event sequence stays gap-free. Only an outage (STORE_UNAVAILABLE) is waited out; `LeaseLost` (another attempt owns
the job) ends the attempt's writing at once. Writes are not replayed after they landed: an outage mid-write is
retried only when the store said it could not be reached.

While nothing is queued a write runs at once, as before (the caller awaits it); once one has failed for the
outage, it and every later one wait in the queue, drained by one task with a capped backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.storage.job_store import LeaseLost

log = structlog.get_logger(__name__)
T = TypeVar("T")

RETRY_FIRST_S = 0.2
RETRY_MAX_S = 2.0

Write = Callable[[], Awaitable[object]]


def is_store_outage(exc: BaseException) -> bool:
    return isinstance(exc, FinetuneError) and exc.kind is ErrorKind.UNAVAILABLE and exc.reason == "STORE_UNAVAILABLE"


class AttemptWrites:
    """Ordered store writes for one attempt of `job_id`; `on_lost` is called once if the lease is gone."""

    def __init__(self, job_id: str, on_lost: Callable[[], None]) -> None:
        self.job_id = job_id
        self._on_lost = on_lost
        self._queued: deque[Write] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self.lost = False

    async def write(self, op: Write) -> None:
        """Run `op` now, or queue it behind the writes an outage holds back; `LeaseLost` is handled here."""
        if self.lost:
            return
        if not self._queued:
            try:
                await op()
                return
            except LeaseLost:
                self._lose()
                return
            except FinetuneError as exc:
                if not is_store_outage(exc):
                    raise
                log.warning("job.store_unreachable_writes_queued", job_id=self.job_id)
        self._queued.append(op)
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def call(self, op: Callable[[], Awaitable[T]]) -> T:
        """After every queued write landed, run `op` and return its value, waiting out an outage. `LeaseLost`
        propagates: the caller's attempt is over."""
        await self.drained()
        delay = RETRY_FIRST_S
        while True:
            try:
                return await op()
            except FinetuneError as exc:
                if not is_store_outage(exc):
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def drained(self) -> None:
        """Until every queued write landed (or the lease was lost)."""
        while self._drainer is not None:
            await asyncio.shield(self._drainer)

    async def close(self) -> None:
        """Stop draining: the server is going away (its queued writes die with it; the job resumes from its
        newest checkpoint on any server, as after a crash)."""
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer

    async def _drain(self) -> None:
        delay = RETRY_FIRST_S
        try:
            while self._queued and not self.lost:
                try:
                    await self._queued[0]()
                except LeaseLost:
                    self._lose()
                    break
                except FinetuneError as exc:
                    if not is_store_outage(exc):
                        # A write the store refused for good (not an outage): it is dropped, the rest still land.
                        log.exception("job.queued_write_refused", job_id=self.job_id)
                        self._queued.popleft()
                        continue
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                self._queued.popleft()
                delay = RETRY_FIRST_S
            if not self.lost:
                log.info("job.queued_writes_landed", job_id=self.job_id)
        finally:
            self._drainer = None

    def _lose(self) -> None:
        self._queued.clear()
        if not self.lost:
            self.lost = True
            self._on_lost()
