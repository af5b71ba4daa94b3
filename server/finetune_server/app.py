"""Server assembly: the job store, the job, export and generation services, the executor, metrics and server info,
wired to the FineTuneService servicer and carried by the gRPC transport (`finetune_server.api.transport`), in
start-up order and back down in shutdown order."""

from __future__ import annotations

import asyncio
import socket

import grpc
import structlog

from finetune_server import faults
from finetune_server.api.auth import TokenTable
from finetune_server.api.interceptors import AccessLogInterceptor, AuthInterceptor, UnavailableFaultInterceptor
from finetune_server.api.servicer import FineTuneServicer
from finetune_server.api.transport import GrpcTransport, on_termination_signals
from finetune_server.host.server_info import ServerInfoProvider
from finetune_server.jobs.datasets import DatasetService
from finetune_server.jobs.exports import ExportService
from finetune_server.jobs.generation import GenerateService
from finetune_server.jobs.service import JobService
from finetune_server.observability.metrics import ServiceMetrics, store_state_counts
from finetune_server.settings import ServerSettings
from finetune_server.storage.data_dir_id import check_data_dir
from finetune_server.storage.dataset_uploads import remove_stale_uploads
from finetune_server.storage.job_store import JobStore
from finetune_server.storage.store_url import open_job_store, redact
from finetune_server.workers.executor import Executor, open_executor
from finetune_server.workers.warm_pool import open_launcher

log = structlog.get_logger(__name__)

STALE_UPLOAD_S = 3600.0


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
        self._executor = executor  # None: the one the settings name, opened at start
        self._launcher = open_launcher(
            settings.warm_workers, settings.layout.forkserver_logs(socket.gethostname())
        )  # how local workers start: warm (forked) or fresh
        self.store: JobStore | None = None
        self.jobs: JobService | None = None
        self.generation: GenerateService | None = None
        self.host = host
        self.port = port
        self.grace = grace
        self._transport: GrpcTransport | None = None
        self._info = ServerInfoProvider(settings)
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None
        self._store_probe: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        if self._executor is None:  # before the port is bound: a cluster that cannot run jobs stops the start
            self._executor = await open_executor(self.settings, self._launcher)
        store_url = self.settings.store
        self.store = open_job_store(store_url)  # StoreRefusedError: unreachable, too new
        try:
            check_data_dir(
                self.store,
                self.settings.layout.data_dir_id,
                data_dir=self.settings.data_dir,
                store_name=redact(store_url.url),
            )
        except BaseException:
            self.store.close()
            self.store = None
            raise
        log.info("job_store.opened", store=redact(store_url.url), shared=self.store.shared)
        # Other servers on a shared data dir may be receiving uploads right now: only clearly abandoned ones go.
        remove_stale_uploads(self.settings, older_than_s=STALE_UPLOAD_S if self.store.shared else 0.0)
        self.metrics = ServiceMetrics(store_state_counts(self.store))
        self.jobs = JobService(self.settings, self.store, self._executor, metrics=self.metrics)
        interceptors: list[grpc.aio.ServerInterceptor] = [AccessLogInterceptor(observe=self.metrics.observe_rpc)]
        if self.settings.auth_token_file is not None:
            interceptors.append(AuthInterceptor(TokenTable.from_file(self.settings.auth_token_file)))
        if faults.active().unavailable_first_calls:
            interceptors.append(UnavailableFaultInterceptor(faults.active().unavailable_first_calls))
        exports = ExportService(self.settings, self.store, self._launcher)
        datasets = DatasetService(self.settings, self.store)
        self.generation = GenerateService(self.settings, self._launcher)
        servicer = FineTuneServicer(
            self.settings, self._info, self.jobs, self.store, exports, datasets, self.generation
        )
        transport = GrpcTransport(
            servicer, interceptors, self.settings, host=self.host, port=self.port, grace=self.grace
        )
        self.port = await transport.start()
        self._transport = transport
        if self.settings.prewarm_workers:  # before the first job: it then starts warm
            await self._executor.prewarm(min(self.settings.slots, self.settings.warm_workers))
        await self.jobs.start()  # re-queues jobs a crash (or an expired lease) left RUNNING, then schedules
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.start_http_server(self.settings.metrics_port, self.host)
        self._info.start_probe()
        await transport.mark_serving()
        self._store_probe = asyncio.create_task(self._probe_store(transport, self.store))
        log.info("server.started", host=self.host, port=self.port, data_dir=str(self.settings.data_dir))
        return self.port

    async def stop(self) -> None:
        """Drain the transport (NOT_SERVING, no new calls, in-flight ones get `grace` seconds), then stop the rest.

        Once: a second SIGTERM (or Ctrl-C) while the first drains waits for that drain instead of starting another
        that would close what the first is still closing."""
        if self._transport is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(self._transport))
        await asyncio.shield(self._stopping)

    async def _stop(self, transport: GrpcTransport) -> None:
        log.info("server.draining", grace_s=self.grace)
        if self._store_probe is not None:  # drained is NOT_SERVING for good: no probe may say otherwise
            self._store_probe.cancel()
        if self.generation is not None:
            self.generation.begin_stop()  # answers in progress end now (CANCELLED), not at the end of the grace
        await transport.drain()
        if self.generation is not None:
            await self.generation.stop()  # its workers exit (each holds a whole model)
        if self.jobs is not None:
            await self.jobs.stop()  # running jobs go back to the queue and resume on any server
        await self._launcher.close()  # after the workers it started
        if self.metrics is not None:
            self.metrics.stop_http_server()  # before the store it reads closes
        if self.store is not None:
            self.store.close()
        await self._info.stop()
        self._stopped.set()
        log.info("server.stopped")

    async def _probe_store(self, transport: GrpcTransport, store: JobStore) -> None:
        """Health follows the job store: NOT_SERVING while it cannot be reached (a load balancer then sends calls
        elsewhere; calls that come anyway are UNAVAILABLE with a RetryInfo), SERVING again once it answers."""
        serving = True
        while True:
            await asyncio.sleep(self.settings.store_probe_s)
            reachable = await asyncio.to_thread(store.reachable)
            if reachable != serving:
                serving = reachable
                log.warning("server.store_" + ("reachable" if reachable else "lost"), serving=serving)
                await transport.mark_serving(serving)

    async def wait(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        on_termination_signals(self.stop)


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
