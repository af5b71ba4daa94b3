"""Idempotency keys as AIP-155 has them: a `request_id` belongs to its owner, and repeats only its own request.

A retry (the same key with the same request) gets what the first call made; the same key with another request is
ALREADY_EXISTS naming what the key made, never a silent answer for a request the caller did not send.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.storage.job_store import JobStore


def fingerprint(request: Any) -> str:
    """A digest of a request's meaningful fields (plain JSON values), stable across processes."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def key_reused(request_id: str, resource_field: str, resource_id: str) -> FinetuneError:
    """The error for a key that came before with another request; `resource_field` names what it made."""
    return FinetuneError(
        ErrorKind.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
        f"request_id {request_id!r} was used for a different request, which made {resource_field} {resource_id}",
        hint="Use a fresh request_id for a new request; repeat one only to retry the very same request.",
        metadata={resource_field: resource_id, "request_id": request_id},
    )


async def claim(
    store: JobStore,
    *,
    owner: str,
    method: str,
    request_id: str,
    request: Any,
    resource_field: str,
    resource_id: str,
) -> str:
    """Bind `request_id` to `resource_id` (unless bound already) and return the id it is bound to; ALREADY_EXISTS
    when the key was first used with a different request. No key: nothing to bind, `resource_id` is returned."""
    if not request_id:
        return resource_id
    digest = fingerprint(request)
    bound, bound_digest = await asyncio.to_thread(
        store.claim_request_key,
        owner=owner,
        method=method,
        request_id=request_id,
        fingerprint=digest,
        resource_id=resource_id,
        now=time.time(),
    )
    if bound_digest != digest:
        raise key_reused(request_id, resource_field, bound)
    return bound
