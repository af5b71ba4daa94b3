"""The gRPC transport around the FineTuneService servicer: message and stream limits, keepalive, plain TCP or TLS
(mutual TLS when a client CA is set), health checking, reflection, and the graceful drain.

What the service does lives in the servicer and what it is built from in `finetune_server.app`; this module only
carries calls in and out.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.api.wire import add_servicer
from finetune_server.settings import ServerSettings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FineTuneService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def tls_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS from --tls-cert/--tls-key, mutual TLS when --tls-client-ca is set too; None: plain TCP."""
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def keepalive_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """The server pings silent connections itself and lets clients ping as often as the settings allow.

    gRPC's defaults would answer a client pinging more than once per 5 minutes with GOAWAY (too_many_pings), and
    would stop pinging a stream that carries no data, such as a WatchJob on a queued job.
    """
    return [
        ("grpc.keepalive_time_ms", _milliseconds(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _milliseconds(settings.keepalive_timeout_s)),
        # gRPC core times out an unanswered ping with this one and never arms keepalive_timeout_ms (grpc/grpc#39239).
        ("grpc.http2.ping_timeout_ms", _milliseconds(settings.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),  # ping, and accept pings, on a connection with no call too
        ("grpc.http2.min_ping_interval_without_data_ms", _milliseconds(settings.keepalive_min_ping_interval_s)),
        ("grpc.http2.max_pings_without_data", 0),  # a stream silent for hours keeps being pinged
    ]


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class GrpcTransport:
    """One grpc.aio server on one address carrying `servicer`, health and reflection.

    `start()` binds and accepts calls, but health reports the FineTuneService SERVING only from `mark_serving()` on,
    once the rest of the server is ready; `drain()` reports NOT_SERVING, refuses new calls and gives in-flight ones
    `grace` seconds before cancelling them.
    """

    def __init__(
        self,
        servicer: pb_grpc.FineTuneServiceServicer,
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        settings: ServerSettings,
        *,
        host: str,
        port: int,
        grace: float,
    ) -> None:
        self._servicer = servicer
        self._interceptors = list(interceptors)
        self._settings = settings
        self.host = host
        self.port = port
        self.grace = grace
        self._health = HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Bind and start accepting calls; returns the bound port (the one picked when `port` is 0)."""
        server = grpc.aio.server(
            interceptors=self._interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_concurrent_streams", self._settings.max_streams_per_connection),
                *keepalive_options(self._settings),
            ],
        )
        add_servicer(self._servicer, server)  # Train and WatchJob send events prebuilt once (api/wire.py)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self.host}:{self.port}"
        credentials = tls_credentials(self._settings)
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        await server.start()
        self._server = server
        return self.port

    async def mark_serving(self, serving: bool = True) -> None:
        """Health: SERVING (or NOT_SERVING, while the job store is lost), for the server as a whole ("") and for the
        FineTuneService."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def drain(self) -> None:
        """Report NOT_SERVING (health watchers hear it), refuse new calls, give in-flight calls `grace` seconds to
        finish, then cancel what is left and stop."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.grace)


def on_termination_signals(stop: Callable[[], Awaitable[None]]) -> None:
    """Run `stop()` on SIGTERM or SIGINT (in the running loop), instead of dying mid-call."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(stop()))
