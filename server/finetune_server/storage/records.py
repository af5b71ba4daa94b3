"""Records of the job service: jobs, their events and uploaded datasets, as the store keeps them.

Payloads are JSON-able dicts whose keys are the contract's field names (JobEvent's oneof members, JobError,
JobResult, TrainingProgress), so the API layer fills messages from them without a per-field mapping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class JobState(enum.Enum):
    """Mirrors the contract's JobState (names without the JOB_STATE_ prefix)."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class EventKind(enum.Enum):
    """The JobEvent oneof member an event fills."""

    STATE_CHANGE = "state_change"  # payload: {"previous", "current" (JobState names), "message", "error"?}
    PROGRESS = "progress"  # payload: TrainingProgress fields (elapsed/eta in seconds)
    EVAL = "eval"  # payload: EvalResult fields
    CHECKPOINT = "checkpoint"  # payload: CheckpointSaved fields
    LOG = "log"  # payload: {"level": "INFO"|..., "message"}
    RESULT = "result"  # payload: JobResult fields


@dataclass(frozen=True)
class JobEventRecord:
    job_id: str
    sequence: int  # per job, from 1, gap-free
    time: float  # unix seconds
    kind: EventKind
    payload: dict[str, Any]


@dataclass
class JobRecord:
    id: str
    state: JobState
    config: dict[str, Any]  # the resolved TrainingConfig as TrainingConfig.to_dict()
    request_id: str = ""
    request_fingerprint: str = ""  # a digest of the request that first used request_id (empty before schema 4)
    display_name: str = ""
    owner: str = ""
    create_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    progress: dict[str, Any] | None = None  # the newest progress payload
    error: dict[str, Any] | None = None  # JobError fields: reason, message, hint, step
    result: dict[str, Any] | None = None  # JobResult fields
    resume_count: int = 0
    attempts: int = 0  # worker starts, for the retry limit
    last_sequence: int = 0
    cancel_requested: bool = False
    queue_position: int = 0  # FIFO order among queued jobs (a re-queued job keeps its original place)
    lease_owner: str = ""  # the server running the job's current attempt ("" when none holds it)
    lease_epoch: int = 0  # +1 per claim: fences the writes of an attempt whose lease was taken away
    lease_expires: float | None = None  # unix seconds by the database's clock
    labels: dict[str, str] = field(default_factory=dict)  # the caller's, set at creation (jobs.labels)

    @property
    def lease(self) -> Lease | None:
        """The lease of the current attempt, while one is held."""
        if self.state is not JobState.RUNNING or not self.lease_owner:
            return None
        return Lease(self.lease_owner, self.lease_epoch)


@dataclass(frozen=True)
class Lease:
    """Who runs a job's attempt: the server's id and the claim's epoch. Writes carrying it are fenced by both."""

    owner: str
    epoch: int


@dataclass(frozen=True)
class DatasetRecord:
    id: str  # "ds-" + 16 hex digits: of the sha256, or with an owner of sha256(owner, sha256) (dataset_id)
    filename: str
    size_bytes: int
    sha256: str
    path: str  # relative to the data dir
    report: dict[str, Any] = field(default_factory=dict)  # DatasetReport fields (no token stats)
    create_time: float = 0.0
    owner: str = ""  # who uploaded it; each owner has its own copy of the same content


@dataclass(frozen=True)
class ArtifactRecord:
    id: str  # "art-" + a digest of (job, format, step): exporting the same thing twice finds it
    job_id: str
    format: str  # "ADAPTER" or "MERGED" (ExportFormat names without the prefix)
    step: int
    base_model: str
    path: str  # its folder, relative to the data dir
    files: list[dict[str, Any]] = field(default_factory=list)  # ArtifactFile fields: path, size_bytes, sha256
    total_size_bytes: int = 0
    vllm: dict[str, Any] = field(default_factory=dict)  # VllmCompatibility fields
    create_time: float = 0.0
    owner: str = ""  # the owner of the job it came from; kept when that job is deleted
