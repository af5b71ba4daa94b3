"""The one place that turns domain errors into gRPC statuses with rich details.

Every servicer method is wrapped by `map_errors`: a FinetuneError becomes a google.rpc.Status with ErrorInfo (reason,
domain, hint), BadRequest field violations (when there are any) and an optional extra detail message; anything else
is logged with its traceback and answered INTERNAL without leaking internals.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from finetune_server.errors import ErrorKind, FinetuneError

DOMAIN = "finetune.sage"
log = structlog.get_logger(__name__)

_CODES: dict[ErrorKind, int] = {kind: getattr(code_pb2, kind.value) for kind in ErrorKind}

F = TypeVar("F", bound=Callable[..., Any])


# Status details travel in trailing metadata, which clients cap (8 KiB by default in gRPC core): keep them well
# under that by listing fewer violations when there are many (the total count is always said).
DETAILS_BUDGET_BYTES = 5000
_VIOLATION_LIMITS = (None, 50, 20, 10, 5, 1)


def _build(error: FinetuneError, extra_detail: Message | None, limit: int | None) -> status_pb2.Status:
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
    return status_pb2.Status(code=_CODES[error.kind], message=message, details=packed)


def to_status(error: FinetuneError, extra_detail: Message | None = None) -> status_pb2.Status:
    status = _build(error, extra_detail, None)
    for limit in _VIOLATION_LIMITS[1:]:
        if status.ByteSize() <= DETAILS_BUDGET_BYTES:
            break
        status = _build(error, extra_detail, limit)
    if status.ByteSize() > DETAILS_BUDGET_BYTES and extra_detail is not None:
        # Still too big (a report echoing a caller's huge field): without the extra detail the answer arrives.
        status = to_status(error)
    return status


async def abort(context: grpc.aio.ServicerContext, error: FinetuneError, extra_detail: Message | None = None) -> None:
    await context.abort_with_status(rpc_status.to_status(to_status(error, extra_detail)))  # type: ignore[attr-defined]


def _detail_of(error: FinetuneError) -> Message | None:
    return error.detail if isinstance(error.detail, Message) else None


def map_errors(method: F) -> F:
    """Wrap a servicer method (unary, or an async generator for server streaming) with the error mapping."""
    name = method.__name__

    async def _handle(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, FinetuneError):
            log.info("rpc.rejected", method=name, reason=exc.reason, kind=exc.kind.value)
            await abort(context, exc, _detail_of(exc))
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
                await _handle(exc, context)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _handle(exc, context)
            raise  # unreachable: abort raises

    return unary_wrapper  # type: ignore[return-value]
