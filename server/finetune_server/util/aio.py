"""Small asyncio pieces the services share."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

T = TypeVar("T")


async def get_unless_done(queue: asyncio.Queue[T], task: asyncio.Future[Any]) -> T | None:
    """The queue's next item, or None when `task` ends first (for queues that never hold None); a waiting get is
    dropped, so no item is lost to it."""
    getter = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    return None
