"""Domain errors: what went wrong, in terms a caller can act on. The API layer maps them to gRPC statuses.

Domain code raises these and never imports grpc; `api/errors.py` is the one place that turns them into
`google.rpc.Status` with ErrorInfo and BadRequest details.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class ErrorKind(enum.Enum):
    """The category of a failure; each maps to exactly one gRPC status code."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    DATA_LOSS = "DATA_LOSS"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class Violation:
    """One problem with one field of a request (`lora.r`), or with one line of a dataset (`line` > 0)."""

    field: str
    reason: str
    message: str
    line: int = 0


@dataclass(frozen=True)
class ConfigWarning:
    field: str
    reason: str
    message: str


class FinetuneError(Exception):
    """A failure the caller can understand and act on."""

    def __init__(
        self,
        kind: ErrorKind,
        reason: str,
        message: str,
        *,
        violations: list[Violation] | None = None,
        hint: str = "",
        metadata: dict[str, str] | None = None,
        detail: Any = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason  # UPPER_SNAKE_CASE, stable: goes into google.rpc.ErrorInfo.reason
        self.message = message
        self.violations = list(violations or [])
        self.hint = hint
        self.metadata = dict(metadata or {})
        self.detail = detail  # an optional domain object the API layer attaches as an extra detail (e.g. a report)

    def __str__(self) -> str:
        return self.message


@dataclass
class ViolationList:
    """Collects violations so that every problem of a request is reported at once."""

    items: list[Violation] = field(default_factory=list)

    def add(self, field_path: str, reason: str, message: str, line: int = 0) -> None:
        self.items.append(Violation(field_path, reason, message, line))

    def __bool__(self) -> bool:
        return bool(self.items)


def field_error(kind: ErrorKind, reason: str, field: str, message: str, hint: str = "") -> FinetuneError:
    """A FinetuneError about one config field: its message names the field, its one violation carries it."""
    return FinetuneError(kind, reason, f"{field}: {message}", violations=[Violation(field, reason, message)], hint=hint)
