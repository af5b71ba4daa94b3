"""Prometheus metrics of one server: RPC counts and latencies, jobs by state, queue length, and each running job's
training speed, served as the text exposition on their own HTTP port.

Every `ServiceMetrics` owns its own `CollectorRegistry` (never prometheus_client's global one), so several servers,
or tests, in one process do not clash. Jobs by state are read from the store at scrape time, not counted from events,
so they are right after a restart and never drift. The recording calls (`observe_rpc`, `on_progress`, `job_ended`)
are cheap and thread-safe: the RPC interceptor and the job service call them on the event loop, the scrape runs on
the HTTP server's thread.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import prometheus_client
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from finetune_server.storage.records import JobState

log = structlog.get_logger(__name__)

# From a 1 ms unary call to a Train/WatchJob stream that lasts an hour (a stream's latency is its whole duration).
RPC_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
    math.inf,
)  # fmt: skip

CountByState = Callable[[], Mapping[str, int]]


class _StateCounter(Protocol):
    def count_in_state(self, state: JobState) -> int: ...


def store_state_counts(store: _StateCounter) -> CountByState:
    """A `count_by_state` reading a job store (its calls take the store's own lock, so any thread may scrape)."""

    def count() -> dict[str, int]:
        return {state.value: store.count_in_state(state) for state in JobState}

    return count


class _JobStateCollector(Collector):
    """`finetune_jobs{state}` and `finetune_queue_length`, from one call of `count_by_state` per scrape."""

    def __init__(self, count_by_state: CountByState) -> None:
        self._count_by_state = count_by_state

    def describe(self) -> list[Metric]:  # fixed names: lets the registry refuse a clash without calling the store
        return [
            GaugeMetricFamily("finetune_jobs", "Jobs by state.", labels=["state"]),
            GaugeMetricFamily("finetune_queue_length", "Jobs waiting for a device slot (QUEUED)."),
        ]

    def collect(self) -> Iterator[Metric]:
        try:
            counts = dict(self._count_by_state())
        except Exception:  # e.g. the store is closed while the server stops: drop these series, keep the scrape
            log.warning("metrics.job_counts_unavailable", exc_info=True)
            return
        queued = counts.get(JobState.QUEUED.value, 0)
        jobs = GaugeMetricFamily("finetune_jobs", "Jobs by state.", labels=["state"])
        for state in JobState:  # every state, zeros included, so a series never vanishes from a dashboard
            jobs.add_metric([state.value], counts.pop(state.value, 0))
        for state_name, count in sorted(counts.items()):  # a state this module does not know yet
            jobs.add_metric([state_name], count)
        yield jobs
        yield GaugeMetricFamily("finetune_queue_length", "Jobs waiting for a device slot (QUEUED).", value=queued)


class ServiceMetrics:
    """The metrics of one server. `count_by_state` (state name -> job count) is called at each scrape."""

    def __init__(self, count_by_state: CountByState | None = None) -> None:
        self.registry = CollectorRegistry()
        self._rpcs = Counter(
            "finetune_rpc_requests",
            "Finished RPCs by method and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "finetune_rpc_duration_seconds",
            "RPC duration in seconds by method (for a stream: until it ends).",
            ["method"],
            buckets=RPC_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._steps_per_second = Gauge(
            "finetune_job_steps_per_second",
            "Optimizer steps per second of a running job, between its two latest progress events.",
            ["job_id"],
            registry=self.registry,
        )
        self._tokens_per_second = Gauge(
            "finetune_job_tokens_per_second",
            "Trained (non-padding) tokens per second of a running job, from its latest progress event.",
            ["job_id"],
            registry=self.registry,
        )
        if count_by_state is not None:
            self.registry.register(_JobStateCollector(count_by_state))
        self._lock = threading.Lock()
        self._last_progress: dict[str, tuple[int, float]] = {}  # job_id -> (step, elapsed seconds)
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    # -- recording ------------------------------------------------------------------------------------------------

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC: `method` as gRPC names it (/package.Service/Method), `code` a StatusCode name."""
        self._rpcs.labels(method, code).inc()
        self._latency.labels(method).observe(max(seconds, 0.0))

    def on_progress(self, job_id: str, payload: Mapping[str, Any]) -> None:
        """A TrainingProgress payload (step, elapsed seconds, tokens_per_second, ...) of a running job.

        Steps/s is the step difference over the elapsed difference since the job's previous progress event; for the
        first event, or after the step went back (a worker restarted from a checkpoint), it is the average so far.
        """
        step = int(payload.get("step") or 0)
        elapsed = float(payload.get("elapsed") or 0.0)
        tokens_per_second = payload.get("tokens_per_second")
        with self._lock:
            previous = self._last_progress.get(job_id)
            self._last_progress[job_id] = (step, elapsed)
            rate: float | None = None  # None: no new step or no time passed; keep the last value
            if previous is not None and step > previous[0] and elapsed > previous[1]:
                rate = (step - previous[0]) / (elapsed - previous[1])
            elif (previous is None or step < previous[0]) and elapsed > 0:
                rate = step / elapsed
            if rate is not None:
                self._steps_per_second.labels(job_id).set(rate)
            if tokens_per_second is not None:
                self._tokens_per_second.labels(job_id).set(float(tokens_per_second))

    def job_ended(self, job_id: str) -> None:
        """Drop the job's speed series (it reached a final state): a finished job has no speed."""
        with self._lock:
            self._last_progress.pop(job_id, None)
            for gauge in (self._steps_per_second, self._tokens_per_second):
                with contextlib.suppress(KeyError):  # it never reported progress
                    gauge.remove(job_id)

    # -- exposition -----------------------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text exposition of this registry, as /metrics serves it."""
        return prometheus_client.generate_latest(self.registry)

    def start_http_server(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on a daemon thread; returns the bound port (port 0 picks a free one)."""
        if self._http is not None:
            raise RuntimeError("the metrics HTTP server is already running")
        self._http, self._http_thread = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_address[1])
        log.info("metrics.started", host=host, port=bound)
        return bound

    def stop_http_server(self) -> None:
        """Stop serving and free the port; a no-op when not serving."""
        http, thread = self._http, self._http_thread
        self._http = self._http_thread = None
        if http is None:
            return
        http.shutdown()
        http.server_close()
        if thread is not None:
            thread.join(timeout=5)
