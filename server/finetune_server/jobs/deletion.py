"""Deleting a job that has ended: its artifacts when asked, then its folder and its record.

Everything that would refuse is checked before anything is removed, so a refused deletion removes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_server.jobs.exports import ExportService
from finetune_server.jobs.service import JobService
from finetune_server.storage.records import JobRecord


@dataclass(frozen=True)
class JobDeletion:
    freed_bytes: int
    artifact_ids: list[str]  # the artifacts deleted with the job


async def delete_job(
    jobs: JobService, exports: ExportService, job: JobRecord, *, with_artifacts: bool = False
) -> JobDeletion:
    """FAILED_PRECONDITION for a job that has not ended, or while it (or, `with_artifacts`, one of its artifacts)
    is exported or downloaded. Without `with_artifacts` its artifacts stay, downloadable as before."""
    jobs.check_deletable(job)
    await jobs.check_not_continued(job)
    with exports.deleting(job.id, []):  # from here no export of the job starts: the list below is complete
        artifacts = await exports.of_job(job.id) if with_artifacts else []
        with exports.deleting("", [a.id for a in artifacts]):
            freed = 0
            for artifact in artifacts:
                freed += await exports.remove(artifact)
            freed += await jobs.delete(job)
    return JobDeletion(freed, [a.id for a in artifacts])
