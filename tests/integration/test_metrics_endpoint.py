"""/metrics over HTTP: the metrics server alone, then a real `finetune serve --metrics-port 0` training a job (whose
worker also writes TensorBoard event files when the optional `tensorboard` extra is installed)."""

from __future__ import annotations

import importlib.util
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.observability.metrics import ServiceMetrics, store_state_counts
from finetune_server.storage.job_store import SqliteJobStore
from finetune_server.storage.records import JobState

from .conftest import start_server, stop_server
from .test_jobs import job_config

SERVICE = "/sage.finetune.v1.FineTuneService"


def scrape(url: str) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """The exposition text and its samples keyed by (name, labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def metrics_url(tmp_path: Path) -> Iterator[tuple[ServiceMetrics, SqliteJobStore, str]]:
    store = SqliteJobStore(tmp_path / "jobs.db")
    metrics = ServiceMetrics(store_state_counts(store))
    port = metrics.start_http_server(0, "127.0.0.1")
    assert port > 0
    yield metrics, store, f"http://127.0.0.1:{port}/metrics"
    metrics.stop_http_server()
    store.close()


def test_the_metrics_server_serves_what_was_recorded(metrics_url: tuple[ServiceMetrics, SqliteJobStore, str]) -> None:
    metrics, store, url = metrics_url
    for i in range(3):
        store.create_job(job_id=f"job-{i}", config={}, now=float(i))
    store.transition("job-0", JobState.RUNNING, now=5.0)
    metrics.observe_rpc(f"{SERVICE}/ValidateConfig", "OK", 0.02)
    metrics.observe_rpc(f"{SERVICE}/ValidateConfig", "OK", 0.04)
    metrics.observe_rpc(f"{SERVICE}/GetJob", "NOT_FOUND", 0.001)
    metrics.on_progress("job-0", {"step": 4, "elapsed": 2.0, "tokens_per_second": 300.0})
    metrics.on_progress("job-0", {"step": 10, "elapsed": 3.0, "tokens_per_second": 350.0})

    text, samples = scrape(url)
    for name in (
        "finetune_rpc_requests_total",
        "finetune_rpc_duration_seconds",
        "finetune_jobs",
        "finetune_queue_length",
        "finetune_job_steps_per_second",
        "finetune_job_tokens_per_second",
    ):
        assert f"# TYPE {name} " in text
    assert sample(samples, "finetune_rpc_requests_total", method=f"{SERVICE}/ValidateConfig", code="OK") == 2
    assert sample(samples, "finetune_rpc_requests_total", method=f"{SERVICE}/GetJob", code="NOT_FOUND") == 1
    assert sample(samples, "finetune_rpc_duration_seconds_count", method=f"{SERVICE}/ValidateConfig") == 2
    assert sample(samples, "finetune_rpc_duration_seconds_bucket", method=f"{SERVICE}/ValidateConfig", le="0.025") == 1
    assert sample(samples, "finetune_jobs", state="QUEUED") == 2
    assert sample(samples, "finetune_jobs", state="RUNNING") == 1
    assert sample(samples, "finetune_jobs", state="SUCCEEDED") == 0
    assert sample(samples, "finetune_queue_length") == 2
    assert sample(samples, "finetune_job_steps_per_second", job_id="job-0") == 6.0
    assert sample(samples, "finetune_job_tokens_per_second", job_id="job-0") == 350.0

    store.transition("job-0", JobState.SUCCEEDED, now=6.0)
    store.transition("job-1", JobState.RUNNING, now=6.0)
    metrics.job_ended("job-0")
    _, samples = scrape(url)  # the store is read again at each scrape
    assert sample(samples, "finetune_jobs", state="SUCCEEDED") == 1
    assert sample(samples, "finetune_queue_length") == 1
    assert sample(samples, "finetune_job_steps_per_second", job_id="job-0") is None
    assert sample(samples, "finetune_job_tokens_per_second", job_id="job-0") is None


def test_stopping_the_metrics_server_frees_its_port() -> None:
    metrics = ServiceMetrics()
    port = metrics.start_http_server(0, "127.0.0.1")
    scrape(f"http://127.0.0.1:{port}/metrics")
    metrics.stop_http_server()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert metrics.start_http_server(port, "127.0.0.1") == port, "the same port binds again"
    metrics.stop_http_server()


@pytest.mark.slow
def test_a_real_server_exposes_rpc_job_and_progress_metrics_and_writes_tensorboard_events(
    tmp_path: Path, server_roots: tuple[Path, Path], tiny_model_dir: Path
) -> None:
    server = start_server(tmp_path, *server_roots, "--metrics-port", "0")
    try:
        assert server.process.stdout is not None
        line = server.process.stdout.readline()  # printed right after "listening on ..."
        assert line.startswith("metrics on "), line
        url = f"http://{line.removeprefix('metrics on ').strip()}/metrics"
        _, before = scrape(url)
        assert sample(before, "finetune_jobs", state="QUEUED") == 0
        assert sample(before, "finetune_queue_length") == 0

        channel, stub = server.stub()
        with channel:
            stub.ListPresets(pb.ListPresetsRequest(), timeout=30)
            stub.ValidateConfig(pb.ValidateConfigRequest(config=job_config(tiny_model_dir.name)), timeout=60)
            stream = stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name)), timeout=300)
            job_id = next(stream).job.id
            during, losses = None, {}
            for message in stream:
                event = message.event
                if event.WhichOneof("kind") == "progress":
                    losses[event.progress.step] = event.progress.loss
                if during is None and event.WhichOneof("kind") == "progress":
                    # The service records the progress in the metrics before it publishes the event.
                    _, during = scrape(url)
                    tokens_per_second = event.progress.tokens_per_second
            assert during is not None, "the job reported progress"

        assert sample(during, "finetune_jobs", state="RUNNING") == 1
        assert sample(during, "finetune_job_tokens_per_second", job_id=job_id) == pytest.approx(tokens_per_second)
        steps_per_second = sample(during, "finetune_job_steps_per_second", job_id=job_id)
        assert steps_per_second is not None and steps_per_second > 0

        _, after = scrape(url)  # the stream has ended: the job is final
        assert sample(after, "finetune_jobs", state="SUCCEEDED") == 1
        assert sample(after, "finetune_jobs", state="RUNNING") == 0
        assert sample(after, "finetune_job_steps_per_second", job_id=job_id) is None, "gone once the job ended"
        assert sample(after, "finetune_job_tokens_per_second", job_id=job_id) is None
        assert sample(after, "finetune_rpc_requests_total", method=f"{SERVICE}/ListPresets", code="OK") == 1
        assert sample(after, "finetune_rpc_requests_total", method=f"{SERVICE}/ValidateConfig", code="OK") == 1
        assert sample(after, "finetune_rpc_duration_seconds_count", method=f"{SERVICE}/ValidateConfig") == 1

        if importlib.util.find_spec("tensorboard") is not None:  # the optional extra: the worker wrote event files
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            accumulator = EventAccumulator(str(server.data_dir / "jobs" / job_id / "tensorboard"))
            accumulator.Reload()
            curve = {e.step: e.value for e in accumulator.Scalars("train/loss")}
            assert sorted(curve) == sorted(losses) == list(range(1, 7))
            assert list(curve.values()) == pytest.approx([losses[step] for step in curve])
    finally:
        assert stop_server(server) == 0
