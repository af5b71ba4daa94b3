"""Cross-cutting RPC concerns, as interceptors that wrap each method handler's behaviour:
one structured access-log line per call (method, peer, status, latency), bearer-token authentication, and the
`unavailable_first_calls` fault drill (see `finetune_server.faults`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
import structlog

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.api.auth import TokenTable, current_principal
from finetune_server.api.errors import abort
from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.faults import ENV_VAR as FAULTS_ENV_VAR

log = structlog.get_logger("finetune_server.rpc")

_HANDLER_FACTORIES = {
    "unary_unary": (grpc.unary_unary_rpc_method_handler, False),
    "unary_stream": (grpc.unary_stream_rpc_method_handler, True),
    "stream_unary": (grpc.stream_unary_rpc_method_handler, False),
    "stream_stream": (grpc.stream_stream_rpc_method_handler, True),
}


class CallHooks(Protocol):
    """`start` runs when a call begins (it may raise FinetuneError to refuse it) and returns a state that `end`
    receives when the call ends, however it ends. `end` must not touch a cancelled call's context: grpc has freed it."""

    def start(self, context: grpc.aio.ServicerContext) -> Any: ...

    def end(self, context: grpc.aio.ServicerContext, state: Any, error: BaseException | None) -> None: ...


def wrap_handler(handler: grpc.RpcMethodHandler, hooks: CallHooks) -> grpc.RpcMethodHandler:
    """The same handler with `hooks` around its behaviour, whatever its streaming shape."""

    async def begin(context: grpc.aio.ServicerContext) -> Any:
        try:
            return hooks.start(context)
        except FinetuneError as exc:
            await abort(context, exc)
            raise  # unreachable: abort raises

    def unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            state = await begin(context)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                hooks.end(context, state, error)

        return wrapped

    def stream(behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            state = await begin(context)
            error: BaseException | None = None
            try:
                responses = behavior(request, context)
                if inspect.isawaitable(responses):  # a handler that writes with context.write (grpc_health's Watch)
                    await responses
                else:
                    async for item in responses:
                        yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                hooks.end(context, state, error)

        return wrapped

    for kind, (factory, streaming) in _HANDLER_FACTORIES.items():
        behavior = getattr(handler, kind)
        if behavior:
            wrapped = stream(behavior) if streaming else unary(behavior)
            return factory(wrapped, handler.request_deserializer, handler.response_serializer)
    return handler


def _was_cancelled(error: BaseException | None) -> bool:
    return isinstance(error, (asyncio.CancelledError, GeneratorExit))


class _AccessLog:
    def __init__(self, method: str, observe: Callable[[str, str, float], None] | None) -> None:
        self._method = method
        self._observe = observe

    def start(self, context: grpc.aio.ServicerContext) -> tuple[float, str]:
        return time.perf_counter(), context.peer()  # read while the call is alive

    def end(self, context: grpc.aio.ServicerContext, state: tuple[float, str], error: BaseException | None) -> None:
        started, peer = state
        seconds = time.perf_counter() - started
        if _was_cancelled(error):
            status = "CANCELLED"  # the client went away; its context is gone
        else:
            code = context.code()
            status = code.name if isinstance(code, grpc.StatusCode) else ("OK" if error is None else "UNKNOWN")
        log.info("rpc", method=self._method, peer=peer, status=status, latency_ms=round(seconds * 1000, 2))
        if self._observe is not None:
            self._observe(self._method, status, seconds)


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """One log line when each call ends; `observe(method, status, seconds)` also feeds metrics when given."""

    def __init__(self, observe: Callable[[str, str, float], None] | None = None) -> None:
        self._observe = observe

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return wrap_handler(handler, _AccessLog(handler_call_details.method, self._observe))


class _Authenticate:
    def __init__(self, tokens: TokenTable) -> None:
        self._tokens = tokens

    def start(self, context: grpc.aio.ServicerContext) -> Any:
        metadata = dict(context.invocation_metadata() or ())
        principal = self._tokens.authenticate(metadata.get("authorization"))
        return current_principal.set(principal)

    def end(self, context: grpc.aio.ServicerContext, state: Any, error: BaseException | None) -> None:
        with contextlib.suppress(ValueError):  # a stream finalised from another context: that context dies anyway
            current_principal.reset(state)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health checking needs a valid bearer token; the caller is known to the servicer through
    `finetune_server.api.auth.current_principal` for the duration of the call."""

    EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)

    def __init__(self, tokens: TokenTable) -> None:
        self._hooks = _Authenticate(tokens)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self.EXEMPT_PREFIXES):
            return handler
        return wrap_handler(handler, self._hooks)


class _RefuseFirstCalls:
    def __init__(self, method: str, calls: collections.Counter[str], refused: int) -> None:
        self._method = method
        self._calls = calls
        self._refused = refused

    def start(self, context: grpc.aio.ServicerContext) -> None:
        self._calls[self._method] += 1  # the event loop runs one start at a time: no lock needed
        attempt = self._calls[self._method]
        if attempt <= self._refused:
            log.warning("fault.unavailable", method=self._method, attempt=attempt)
            raise FinetuneError(
                ErrorKind.UNAVAILABLE,
                "INJECTED_UNAVAILABLE",
                f"call {attempt} of {self._method} refused on purpose ({FAULTS_ENV_VAR} unavailable_first_calls)",
            )

    def end(self, context: grpc.aio.ServicerContext, state: Any, error: BaseException | None) -> None:
        return


class UnavailableFaultInterceptor(grpc.aio.ServerInterceptor):
    """Answers the first `refused` calls of each FineTuneService method UNAVAILABLE, through the one error mapping,
    as a restarting server would: what retries a caller's policy makes, and what it does not, becomes visible."""

    SERVICE_PREFIX = f"/{pb.DESCRIPTOR.services_by_name['FineTuneService'].full_name}/"

    def __init__(self, refused: int) -> None:
        self._refused = refused
        self._calls: collections.Counter[str] = collections.Counter()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.SERVICE_PREFIX):
            return handler
        return wrap_handler(handler, _RefuseFirstCalls(method, self._calls, self._refused))
