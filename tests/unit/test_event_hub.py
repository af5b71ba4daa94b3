"""The event hub hands each watcher exactly the events after its position, from memory."""

from __future__ import annotations

import asyncio

from finetune_server.jobs.event_hub import RECENT_EVENTS_PER_JOB, EventHub
from finetune_server.storage.records import EventKind, JobEventRecord


def events(job_id: str, first: int, last: int) -> list[JobEventRecord]:
    return [JobEventRecord(job_id, n, float(n), EventKind.LOG, {"message": str(n)}) for n in range(first, last + 1)]


def test_recent_after_returns_exactly_the_newer_events() -> None:
    hub = EventHub()
    hub.publish(events("job-a", 1, 10))
    hub.publish(events("job-a", 5, 12))  # already-seen sequences are ignored
    assert [e.sequence for e in hub.recent_after("job-a", 0) or []] == list(range(1, 13))
    assert [e.sequence for e in hub.recent_after("job-a", 7) or []] == [8, 9, 10, 11, 12]
    assert hub.recent_after("job-a", 12) == []
    assert hub.recent_after("job-b", 0) is None


def test_memory_that_no_longer_reaches_back_defers_to_the_store() -> None:
    hub = EventHub()
    hub.publish(events("job-a", 1, RECENT_EVENTS_PER_JOB + 10))
    assert hub.recent_after("job-a", 3) is None, "events 4..10 fell out of the buffer"
    tail = hub.recent_after("job-a", RECENT_EVENTS_PER_JOB + 5) or []
    assert [e.sequence for e in tail] == list(range(RECENT_EVENTS_PER_JOB + 6, RECENT_EVENTS_PER_JOB + 11))


async def test_waiters_wake_on_publication() -> None:
    hub = EventHub()
    hub.publish(events("job-a", 1, 2))

    async def publish_next() -> None:  # runs after the waiter is parked on the hub (gather starts them in order)
        hub.publish(events("job-a", 3, 3))

    await asyncio.wait_for(asyncio.gather(hub.wait_beyond("job-a", 2), publish_next()), timeout=5)
    assert hub.latest("job-a") == 3


async def still_waiting(waiter: asyncio.Task[None]) -> bool:
    """True when `waiter` has not finished after the loop had ample turns to run it (a task that must NOT finish:
    the timeout only bounds how long we give it to misbehave)."""
    done, _ = await asyncio.wait({waiter}, timeout=0.05)
    return not done


async def test_a_waiter_blocks_until_an_event_beyond_its_sequence_is_published() -> None:
    hub = EventHub()
    hub.publish(events("job-a", 1, 2))
    await asyncio.wait_for(hub.wait_beyond("job-a", 1), timeout=5)  # event 2 is already beyond 1: no waiting
    waiter = asyncio.create_task(hub.wait_beyond("job-a", 2))
    further = asyncio.create_task(hub.wait_beyond("job-a", 3))
    assert await still_waiting(waiter), "nothing beyond 2 has been published"
    hub.publish(events("job-a", 2, 2))  # an already-seen sequence changes nothing
    hub.publish(events("job-b", 3, 3))  # nor does another job's event
    assert await still_waiting(waiter)
    hub.publish(events("job-a", 3, 3))
    await asyncio.wait_for(waiter, timeout=5)  # woken by the publication
    assert await still_waiting(further), "3 is not beyond 3: this one waits for the next publication"
    hub.publish(events("job-a", 4, 4))
    await asyncio.wait_for(further, timeout=5)
