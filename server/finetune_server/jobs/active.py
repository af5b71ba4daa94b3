"""The queued and running jobs that still need something a caller wants to delete (a dataset, a job's adapter)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.storage.job_store import JobStore
from finetune_server.storage.records import JobRecord, JobState


async def refuse_while_used(
    store: JobStore, uses: Callable[[JobRecord], bool], *, what: str, reason: str, how: str
) -> None:
    """FAILED_PRECONDITION `reason`, naming the job, when a queued or running job `uses` what is to be deleted."""
    for state in (JobState.QUEUED, JobState.RUNNING):
        for job in await asyncio.to_thread(store.jobs_in_state, state):
            if uses(job):
                raise FinetuneError(
                    ErrorKind.FAILED_PRECONDITION,
                    reason,
                    f"{what} is {how} job {job.id}, which is {state.value.lower()}",
                    hint=f"Wait for job {job.id} to end, or cancel it, then delete {what}.",
                    metadata={"job_id": job.id},
                )
