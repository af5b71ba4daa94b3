"""Fan-out of job events to watchers: one notification per new event, however many watchers.

The store is the source of truth; the hub keeps each active job's recent events in memory and wakes waiting
watchers when new ones are stored, so watchers neither poll SQLite in a loop nor read it once per event each.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field

from finetune_server.storage.records import JobEventRecord

RECENT_EVENTS_PER_JOB = 2048


@dataclass
class _JobChannel:
    recent: deque[JobEventRecord] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS_PER_JOB))
    latest: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: int = 0


class EventHub:
    def __init__(self) -> None:
        self._channels: dict[str, _JobChannel] = {}

    def _channel(self, job_id: str) -> _JobChannel:
        return self._channels.setdefault(job_id, _JobChannel())

    def publish(self, events: list[JobEventRecord]) -> None:
        """Announce stored events (in sequence order) to the watchers of their jobs."""
        touched: set[str] = set()
        for event in events:
            channel = self._channel(event.job_id)
            if event.sequence <= channel.latest:
                continue
            channel.recent.append(event)
            channel.latest = event.sequence
            touched.add(event.job_id)
        for job_id in touched:
            channel = self._channels[job_id]
            channel.changed.set()
            channel.changed = asyncio.Event()  # the next waiters wait for the next publication

    def latest(self, job_id: str) -> int:
        channel = self._channels.get(job_id)
        return channel.latest if channel else 0

    def recent_after(self, job_id: str, after_sequence: int) -> list[JobEventRecord] | None:
        """Events after `after_sequence` from memory, or None when memory does not reach back that far."""
        channel = self._channels.get(job_id)
        if channel is None or not channel.recent or channel.recent[0].sequence > after_sequence + 1:
            return None
        # Sequences in the buffer are consecutive, so the first wanted event is found by arithmetic, not a scan:
        # with many watchers each new event costs each of them O(new events), not O(buffer).
        start = max(0, after_sequence + 1 - channel.recent[0].sequence)
        return list(itertools.islice(channel.recent, start, None))

    async def wait_beyond(self, job_id: str, sequence: int) -> None:
        """Return once an event with a sequence greater than `sequence` has been published."""
        channel = self._channel(job_id)
        channel.waiters += 1
        try:
            while channel.latest <= sequence:
                await channel.changed.wait()
        finally:
            channel.waiters -= 1

    def watched(self) -> list[str]:
        """The jobs someone is waiting on (another server's writes to them must be read into the hub)."""
        return [job_id for job_id, channel in self._channels.items() if channel.waiters]

    def is_watched(self, job_id: str) -> bool:
        channel = self._channels.get(job_id)
        return channel is not None and channel.waiters > 0

    def forget(self, job_id: str) -> None:
        """Drop a finished job's buffer (watchers then read the store)."""
        self._channels.pop(job_id, None)
