"""Errors of the remote service, parsed from the rich google.rpc.Status the server sends.

The server puts a `google.rpc.ErrorInfo` (reason, domain, metadata with an optional "hint"), often a
`google.rpc.BadRequest`, and for rejected configs the whole `ValidateConfigResponse` into the status details; a
`google.rpc.RetryInfo` when the same request may succeed later (UNAVAILABLE, a full queue), a `google.rpc.ResourceInfo`
per missing thing (NOT_FOUND) and a `google.rpc.QuotaFailure` for a server limit. Callers get one exception type with
those pieces as attributes instead of digging through trailing metadata.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client.interface import FieldViolation

__all__ = ["FinetuneServiceError", "MissingResource", "QuotaViolation", "ServerUnavailableError", "from_rpc_error"]

logger = logging.getLogger(__name__)

_DETAILS_KEY = "grpc-status-details-bin"
_DETAIL_TYPES: dict[str, type[Message]] = {
    kind.DESCRIPTOR.full_name: kind
    for kind in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
        error_details_pb2.ResourceInfo,
        error_details_pb2.QuotaFailure,
        pb.ValidateConfigResponse,
    )
}
_LINE_PREFIX = re.compile(r"^(line|element|row) (\d+):\s*")  # JSONL lines, JSON array elements, table rows


@dataclass(frozen=True)
class MissingResource:
    """What a NOT_FOUND is about (google.rpc.ResourceInfo): e.g. `finetune.sage/Job` named `job-3f2a...`."""

    resource_type: str
    resource_name: str
    description: str = ""
    owner: str = ""


@dataclass(frozen=True)
class QuotaViolation:
    """A server limit the call ran into (google.rpc.QuotaFailure): `quota_id` names the server setting."""

    subject: str
    description: str
    quota_id: str = ""
    quota_metric: str = ""


class FinetuneServiceError(Exception):
    """A failed call: the gRPC code plus the server's reason, hint, field violations and (for configs) report.

    `retry_delay` (seconds) is set when the server says the same request may succeed after that long; `resources`
    lists what a NOT_FOUND could not find, `quota_violations` the server limits a call ran into.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        hint: str = "",
        violations: list[FieldViolation] | None = None,
        report: pb.ValidateConfigResponse | None = None,
        metadata: dict[str, str] | None = None,
        domain: str = "",
        retry_delay: float | None = None,
        resources: list[MissingResource] | None = None,
        quota_violations: list[QuotaViolation] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.hint = hint
        self.violations = list(violations or [])
        self.report = report
        self.metadata = dict(metadata or {})
        self.domain = domain
        self.retry_delay = retry_delay
        self.resources = list(resources or [])
        self.quota_violations = list(quota_violations or [])

    def __str__(self) -> str:
        head = f"{self.code.name}"
        if self.reason:
            head += f" ({self.reason})"
        text = f"{head}: {self.message}"
        if self.violations:
            text += "".join(f"\n  - {v}" for v in self.violations)
        if self.hint and self.hint not in self.message:  # the server may already say it in the message
            text += f"\n  hint: {self.hint}"
        return text


class ServerUnavailableError(FinetuneServiceError):
    """The server could not be reached (UNAVAILABLE), after any retries; `address` names where we tried."""

    def __init__(self, message: str, *, address: str = "", **kwargs: Any) -> None:
        self.address = address
        if address and address not in message:
            message = f"server at {address} is unavailable: {message}"
        super().__init__(grpc.StatusCode.UNAVAILABLE, message, **kwargs)


def from_rpc_error(error: grpc.RpcError, *, address: str = "") -> FinetuneServiceError:
    """Turn a grpc.RpcError (which is also a grpc.Call) into a FinetuneServiceError, reading the rich status."""
    code = _call_attr(error, "code") or grpc.StatusCode.UNKNOWN
    message = _call_attr(error, "details") or str(error)
    status = _rich_status(error)
    fields: dict[str, Any] = {}
    if status is not None:
        message = status.message or message
        fields = _parse_details(status.details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailableError(message, address=address, **fields)
    return FinetuneServiceError(code, message, **fields)


def _call_attr(error: grpc.RpcError, name: str) -> Any:
    method = getattr(error, name, None)
    try:
        return method() if callable(method) else None
    except Exception:  # a broken call object must not hide the original error
        return None


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    try:
        return rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        # code/message in the status disagree with the call's (e.g. a proxy rewrote them): the details still count.
        pass
    except AttributeError:
        return None
    for key, value in _call_attr(error, "trailing_metadata") or ():
        if key == _DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def _parse_details(details: list[any_pb2.Any] | Any) -> dict[str, Any]:
    """The FinetuneServiceError keyword arguments that the status details carry (unknown detail types are skipped)."""
    found: dict[type[Message], list[Any]] = {kind: [] for kind in _DETAIL_TYPES.values()}
    for detail in details:
        kind = _DETAIL_TYPES.get(detail.TypeName())
        if kind is None:
            logger.debug("ignoring error detail of type %s", detail.type_url)
            continue
        message = kind()
        detail.Unpack(message)
        found[kind].append(message)
    fields: dict[str, Any] = {}
    for info in found[error_details_pb2.ErrorInfo][:1]:
        fields.update(
            reason=info.reason, domain=info.domain, hint=info.metadata.get("hint", ""), metadata=dict(info.metadata)
        )
    for report in found[pb.ValidateConfigResponse][:1]:
        fields["report"] = report
        fields["violations"] = [FieldViolation(v.field, v.reason, v.message, int(v.line)) for v in report.violations]
    for bad_request in found[error_details_pb2.BadRequest][:1]:
        if not fields.get("violations"):
            fields["violations"] = [_from_bad_request(v) for v in bad_request.field_violations]
    for retry in found[error_details_pb2.RetryInfo][:1]:
        fields["retry_delay"] = retry.retry_delay.ToNanoseconds() / 1e9
    fields["resources"] = [
        MissingResource(r.resource_type, r.resource_name, r.description, r.owner)
        for r in found[error_details_pb2.ResourceInfo]
    ]
    fields["quota_violations"] = [
        QuotaViolation(v.subject, v.description, v.quota_id, v.quota_metric)
        for quota in found[error_details_pb2.QuotaFailure]
        for v in quota.violations
    ]
    return fields


def _from_bad_request(violation: error_details_pb2.BadRequest.FieldViolation) -> FieldViolation:
    """BadRequest has no line field: dataset problems say `line N: ...` (`element N`, `row N`) in the description.
    `line N: ` is taken off the message (the line field says it); the other units stay, for they say what N counts."""
    description = violation.description
    match = _LINE_PREFIX.match(description)
    line = int(match.group(2)) if match else 0
    message = description[match.end() :] if match and match.group(1) == "line" else description
    return FieldViolation(violation.field, violation.reason, message, line)
