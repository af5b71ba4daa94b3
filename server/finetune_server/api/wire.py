"""Job events in their wire form, made once: every watcher of a job is sent the same bytes.

A job's event reaches each of its watchers (Train streams and WatchJob streams alike). Converting and serialising it
once per watcher costs the server's event loop the same work N times, on the cores training shares; here the
response bytes are built once per event and kept for a while (all watchers of a live job read an event within
moments of each other), and the two streaming methods are registered with a serializer that passes bytes through.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import grpc

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.api.convert import event_to_proto
from finetune_server.storage.records import JobEventRecord

SERVICE = "sage.finetune.v1.FineTuneService"
PREBUILT_METHODS = ("Train", "WatchJob")  # their responses may be bytes built by EventWire
CACHED_EVENTS = 4096


class EventWire:
    """Serialised TrainResponse / WatchJobResponse per event, least recently used dropped beyond `capacity`."""

    def __init__(self, capacity: int = CACHED_EVENTS) -> None:
        self._capacity = capacity
        self._bytes: OrderedDict[tuple[str, int, str], bytes] = OrderedDict()

    def train_response(self, event: JobEventRecord) -> bytes:
        return self._get(event, "train", lambda e: pb.TrainResponse(event=e))

    def watch_response(self, event: JobEventRecord) -> bytes:
        return self._get(event, "watch", lambda e: pb.WatchJobResponse(event=e))

    def _get(self, event: JobEventRecord, method: str, wrap: Callable[[pb.JobEvent], Any]) -> bytes:
        key = (event.job_id, event.sequence, method)  # an event's sequence names it for good
        found = self._bytes.get(key)
        if found is not None:
            self._bytes.move_to_end(key)
            return found
        wire: bytes = wrap(event_to_proto(event)).SerializeToString()
        self._bytes[key] = wire
        if len(self._bytes) > self._capacity:
            self._bytes.popitem(last=False)
        return wire


def _passing_bytes(serializer: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def serialize(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serializer(message)

    return serialize


class _Capture:
    """Stands in for the server while the generated code registers the service, to keep its method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        pass  # built again below from the captured method handlers

    def add_registered_method_handlers(self, _service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = dict(handlers)


def add_servicer(servicer: pb_grpc.FineTuneServiceServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that Train and WatchJob also accept prebuilt response bytes."""
    capture = _Capture()
    pb_grpc.add_FineTuneServiceServicer_to_server(servicer, capture)  # type: ignore[arg-type]
    handlers = capture.handlers
    for name in PREBUILT_METHODS:
        handler = handlers[name]
        assert handler.response_serializer is not None  # the generated handlers all have one
        handlers[name] = handler._replace(  # type: ignore[attr-defined]
            response_serializer=_passing_bytes(handler.response_serializer)
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]
