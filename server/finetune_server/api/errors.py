"""The one place that turns domain errors into gRPC statuses with rich details.

Every servicer method is wrapped by `map_errors`: a FinetuneError becomes a google.rpc.Status with ErrorInfo (reason,
domain, hint), BadRequest field violations (when there are any), the details AIP-193 asks for by kind (RetryInfo when
retrying the same request can succeed, ResourceInfo for each missing thing, QuotaFailure for a server limit) and an
optional extra detail message; anything else is logged with its traceback and answered INTERNAL without leaking
internals.
"""

from __future__ import annotations

import functools
import inspect
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from finetune_server.errors import ErrorKind, FinetuneError

DOMAIN = "finetune.sage"
log = structlog.get_logger(__name__)

_CODES: dict[ErrorKind, int] = {kind: getattr(code_pb2, kind.value) for kind in ErrorKind}

F = TypeVar("F", bound=Callable[..., Any])


# A status travels in trailing metadata, which clients cap (8 KiB by default in gRPC core, refused at random between
# the soft and the hard limit): grpc-status-details-bin (base64 of the Status) plus grpc-message (percent-encoded)
# must stay under it with room for the other headers. Fewer violations are listed when there are many (the total
# count is always said); a message that echoes a caller's huge name is cut.
METADATA_BUDGET_BYTES = 6500
_VIOLATION_LIMITS = (None, 50, 20, 10, 5, 1)
_MESSAGE_CHARS = 1000
_PLAIN = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"  # what grpc-message leaves unencoded besides letters and digits


# How long to wait before sending the same request again, where that can succeed: UNAVAILABLE is a restart, a network
# blip or an unreachable hub (seconds); a full queue empties only as running jobs end (minutes).
UNAVAILABLE_RETRY_DELAY_S = 1.0
QUEUE_FULL_RETRY_DELAY_S = 30.0
GENERATE_BUSY_RETRY_DELAY_S = 2.0  # a chat answer takes seconds
_RETRY_DELAYS_S = {"QUEUE_FULL": QUEUE_FULL_RETRY_DELAY_S, "GENERATE_BUSY": GENERATE_BUSY_RETRY_DELAY_S}

# The server limits a request can run into, by reason: the server setting that sets the limit, and what it counts.
_QUOTAS: dict[str, tuple[str, str]] = {
    "QUEUE_FULL": ("max_queued_jobs", f"{DOMAIN}/queued_jobs"),
    "UPLOAD_TOO_LARGE": ("max_upload_bytes", f"{DOMAIN}/upload_bytes"),
    "GENERATE_BUSY": ("max_generate_workers", f"{DOMAIN}/generate_workers"),
}

# What a NOT_FOUND is about, by reason: the resource type and the request field whose value named it. The request,
# not the domain error, carries the name: ResourceInfo says what the caller asked for.
_MISSING: dict[str, tuple[str, str]] = {
    "JOB_NOT_FOUND": ("Job", "job_id"),
    "ADAPTER_NOT_FOUND": ("Adapter", "job_id"),  # the job's final adapter
    "CHECKPOINT_NOT_FOUND": ("Checkpoint", "checkpoint_step"),
    "ARTIFACT_NOT_FOUND": ("Artifact", "artifact_id"),
    "FILE_NOT_FOUND": ("ArtifactFile", "path"),
    "DATASET_NOT_FOUND": ("Dataset", "dataset"),
    "UPLOADED_DATASET_NOT_FOUND": ("Dataset", "dataset_id"),
    "MODEL_NOT_FOUND": ("Model", "model_name"),
    "MODEL_NOT_CACHED_OFFLINE": ("Model", "model_name"),
}
# A rejected config names its missing model or datasets in violations, whose field says which config field it was.
_CONFIG_RESOURCES = {
    "model_name": "Model",
    "dataset": "Dataset",
    "eval_dataset": "Dataset",
    "init_from_job": "Job",
    "init_from_checkpoint": "Checkpoint",
}
_NOT_FOUND_VIOLATIONS = frozenset({"NOT_FOUND", *_MISSING})


def _retry_info(error: FinetuneError) -> error_details_pb2.RetryInfo | None:
    if error.kind is ErrorKind.UNAVAILABLE:
        delay = UNAVAILABLE_RETRY_DELAY_S
    elif error.reason in _RETRY_DELAYS_S:
        delay = _RETRY_DELAYS_S[error.reason]
    else:
        return None
    retry_delay = duration_pb2.Duration()
    retry_delay.FromNanoseconds(round(delay * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=retry_delay)


def _quota_failure(error: FinetuneError) -> error_details_pb2.QuotaFailure | None:
    if error.reason not in _QUOTAS:
        return None
    quota_id, metric = _QUOTAS[error.reason]
    violation = error_details_pb2.QuotaFailure.Violation(
        subject="server", description=error.message, quota_id=quota_id, quota_metric=metric
    )
    return error_details_pb2.QuotaFailure(violations=[violation])


def _request_value(request: object, field: str) -> str:
    """The value of `field` in the request, or in its training config (where config violations point)."""
    for message in (request, getattr(request, "config", None)):
        if isinstance(message, Message) and field in message.DESCRIPTOR.fields_by_name:
            return str(getattr(message, field))
    return ""


def _resource_infos(error: FinetuneError, request: object) -> list[error_details_pb2.ResourceInfo]:
    if error.kind is not ErrorKind.NOT_FOUND:
        return []
    infos = [
        error_details_pb2.ResourceInfo(
            resource_type=f"{DOMAIN}/{_CONFIG_RESOURCES[v.field]}",
            resource_name=_request_value(request, v.field),
            description=v.message,
        )
        for v in error.violations
        if v.field in _CONFIG_RESOURCES and v.reason in _NOT_FOUND_VIOLATIONS
    ]
    if not infos and error.reason in _MISSING:
        resource_type, field = _MISSING[error.reason]
        infos.append(
            error_details_pb2.ResourceInfo(
                resource_type=f"{DOMAIN}/{resource_type}",
                resource_name=_request_value(request, field),
                description=error.message,
            )
        )
    return infos


def _kind_details(error: FinetuneError, request: object) -> list[Message]:
    """The details AIP-193 pairs with the error's code: RetryInfo, ResourceInfo, QuotaFailure."""
    details: list[Message] = list(_resource_infos(error, request))
    for detail in (_retry_info(error), _quota_failure(error)):
        if detail is not None:
            details.append(detail)
    return details


def _build(
    error: FinetuneError, extra_detail: Message | None, limit: int | None, request: object = None
) -> status_pb2.Status:
    metadata = dict(error.metadata)
    if error.hint:
        metadata["hint"] = error.hint
    shown = error.violations[:limit]
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)]
    if shown:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field,
                    description=f"line {v.line}: {v.message}" if v.line else v.message,
                    reason=v.reason,
                )
                for v in shown
            ]
        )
        hidden = len(error.violations) - len(shown)
        if hidden:
            bad_request.field_violations.add(
                field="", reason="MORE_VIOLATIONS", description=f"{hidden} more violations not listed"
            )
        details.append(bad_request)
    details += _kind_details(error, request)
    if extra_detail is not None:
        trimmed = type(extra_detail)()
        trimmed.CopyFrom(extra_detail)
        if limit is not None and "violations" in trimmed.DESCRIPTOR.fields_by_name:
            del trimmed.violations[limit:]  # type: ignore[attr-defined]
        details.append(trimmed)
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    message = error.message if not error.hint else f"{error.message} (hint: {error.hint})"
    return status_pb2.Status(code=_CODES[error.kind], message=_clip(message, _MESSAGE_CHARS), details=packed)


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else f"{text[:chars]}... ({len(text) - chars} more characters)"


def _wire_bytes(status: status_pb2.Status) -> int:
    """What `status` costs in trailing metadata: the base64 of the whole Status and the percent-encoded message."""
    return 4 * ((status.ByteSize() + 2) // 3) + len(urllib.parse.quote(status.message, safe=_PLAIN))


def to_status(error: FinetuneError, extra_detail: Message | None = None, request: object = None) -> status_pb2.Status:
    """The rich status of `error`; `request` (the call's request message, when known) names what was not found."""
    status = _build(error, extra_detail, None, request)
    for limit in _VIOLATION_LIMITS[1:]:
        if _wire_bytes(status) <= METADATA_BUDGET_BYTES:
            break
        status = _build(error, extra_detail, limit, request)
    if _wire_bytes(status) > METADATA_BUDGET_BYTES and extra_detail is not None:
        # Still too big (a report echoing a caller's huge field): without the extra detail the answer arrives.
        status = to_status(error, request=request)
    if _wire_bytes(status) > METADATA_BUDGET_BYTES:
        # The details themselves echo caller-sized strings (a name thousands of characters long): say what went wrong.
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN))
        status = status_pb2.Status(code=status.code, message=_clip(status.message, 200), details=[info])
    return status


async def abort(
    context: grpc.aio.ServicerContext, error: FinetuneError, extra_detail: Message | None = None, request: object = None
) -> None:
    status = rpc_status.to_status(to_status(error, extra_detail, request))
    await context.abort_with_status(status)  # type: ignore[attr-defined]


def _detail_of(error: FinetuneError) -> Message | None:
    return error.detail if isinstance(error.detail, Message) else None


def map_errors(method: F) -> F:
    """Wrap a servicer method (unary, or an async generator for server streaming) with the error mapping."""
    name = method.__name__

    async def _handle(exc: BaseException, context: grpc.aio.ServicerContext, request: object) -> None:
        if isinstance(exc, FinetuneError):
            log.info("rpc.rejected", method=name, reason=exc.reason, kind=exc.kind.value)
            await abort(context, exc, _detail_of(exc), request)
        log.exception("rpc.internal_error", method=name)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except (grpc.aio.AbortError, StopAsyncIteration):
                raise
            except Exception as exc:
                await _handle(exc, context, request)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _handle(exc, context, request)
            raise  # unreachable: abort raises

    return unary_wrapper  # type: ignore[return-value]
