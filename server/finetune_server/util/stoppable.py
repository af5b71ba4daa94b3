"""Server work in a thread that stops when the request it serves is gone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_stoppable(fn: Callable[[Callable[[], bool]], T], *, timeout_s: float | None = None) -> T:
    """`fn(should_stop)` in a worker thread, off the event loop.

    `should_stop()` turns True when the awaiting task is cancelled (gRPC cancels a handler whose caller cancelled,
    went away or ran out of deadline) or once `timeout_s` (the caller's remaining deadline) has passed, so long work
    polls it and frees what it holds instead of working on for nobody. A cancelled await returns at once; the thread
    ends at its next poll.
    """
    stop = threading.Event()
    give_up = None if timeout_s is None else time.monotonic() + timeout_s

    def should_stop() -> bool:
        return stop.is_set() or (give_up is not None and time.monotonic() >= give_up)

    try:
        return await asyncio.to_thread(fn, should_stop)
    except asyncio.CancelledError:
        stop.set()
        raise
