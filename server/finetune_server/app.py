"""Server assembly: the FineTuneService, health, reflection, access logs, graceful shutdown."""

from __future__ import annotations

import asyncio
import signal

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.api.auth import TokenTable
from finetune_server.api.interceptors import AccessLogInterceptor, AuthInterceptor
from finetune_server.api.servicer import FineTuneServicer
from finetune_server.host.server_info import ServerInfoProvider
from finetune_server.jobs.exports import ExportService
from finetune_server.jobs.service import JobService
from finetune_server.observability.metrics import ServiceMetrics, store_state_counts
from finetune_server.settings import ServerSettings
from finetune_server.storage.dataset_uploads import remove_stale_uploads
from finetune_server.storage.job_store import SqliteJobStore
from finetune_server.workers.executor import Executor, LocalSubprocessExecutor

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FineTuneService"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class FinetuneServer:
    """One gRPC server on one address. `start()` returns the bound port (useful with port 0)."""

    def __init__(
        self,
        settings: ServerSettings,
        host: str = "127.0.0.1",
        port: int = 50051,
        grace: float = 10.0,
        executor: Executor | None = None,
    ):
        self.settings = settings
        self.metrics: ServiceMetrics | None = None
        self.metrics_port: int | None = None  # the bound /metrics port once started, when settings ask for one
        self._executor = executor or LocalSubprocessExecutor()
        self.store: SqliteJobStore | None = None
        self.jobs: JobService | None = None
        self.host = host
        self.port = port
        self.grace = grace
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._info = ServerInfoProvider(settings)
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_uploads(self.settings)
        self.store = SqliteJobStore(self.settings.layout.store)
        self.metrics = ServiceMetrics(store_state_counts(self.store))
        self.jobs = JobService(self.settings, self.store, self._executor, metrics=self.metrics)
        interceptors: list[grpc.aio.ServerInterceptor] = [AccessLogInterceptor(observe=self.metrics.observe_rpc)]
        if self.settings.auth_token_file is not None:
            interceptors.append(AuthInterceptor(TokenTable.from_file(self.settings.auth_token_file)))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_concurrent_streams", self.settings.max_streams_per_connection),
            ],
        )
        exports = ExportService(self.settings, self.store)
        servicer = FineTuneServicer(self.settings, self._info, self.jobs, self.store, exports)
        pb_grpc.add_FineTuneServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        address = f"{self.host}:{self.port}"
        credentials = self._tls_credentials()
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        await server.start()
        self._server = server
        await self.jobs.start()  # re-queues jobs a crash left RUNNING, then schedules
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.start_http_server(self.settings.metrics_port, self.host)
        self._info.start_probe()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("server.started", host=self.host, port=self.port, data_dir=str(self.settings.data_dir))
        return self.port

    def _tls_credentials(self) -> grpc.ServerCredentials | None:
        settings = self.settings
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

    async def stop(self) -> None:
        """Drain: report NOT_SERVING, refuse new calls, give in-flight streams `grace` seconds, then stop."""
        if self._server is None or self._stopped.is_set():
            return
        log.info("server.draining", grace_s=self.grace)
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.grace)
        if self.jobs is not None:
            await self.jobs.stop()  # running jobs stay RUNNING and resume at the next start
        if self.metrics is not None:
            self.metrics.stop_http_server()  # before the store it reads closes
        if self.store is not None:
            self.store.close()
        await self._info.stop()
        self._stopped.set()
        log.info("server.stopped")

    async def wait(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))


async def serve(
    settings: ServerSettings,
    host: str,
    port: int,
    grace: float,
    on_bound: object = None,
    on_metrics_bound: object = None,
) -> None:
    """Run until SIGTERM/SIGINT. `on_bound(host, port)` is called once the port is bound, then
    `on_metrics_bound(host, metrics_port)` when the settings ask for a metrics endpoint."""
    server = FinetuneServer(settings, host, port, grace)
    bound = await server.start()
    server.install_signal_handlers()
    if callable(on_bound):
        on_bound(host, bound)
    if callable(on_metrics_bound) and server.metrics_port is not None:
        on_metrics_bound(host, server.metrics_port)
    await server.wait()
