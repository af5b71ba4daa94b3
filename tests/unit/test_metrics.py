"""ServiceMetrics (Prometheus) and the TensorBoard event sink of the worker."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from finetune_server.observability.metrics import ServiceMetrics, store_state_counts
from finetune_server.observability.tensorboard import TensorBoardSink, tensorboard_sink
from finetune_server.training.engine.events import (
    CheckpointEvent,
    DeviceMemoryReading,
    EvalEvent,
    LogEvent,
    LogLevel,
    ProgressEvent,
)
from finetune_server.workers.train import event_message

TRAIN = "/sage.finetune.v1.FineTuneService/Train"
VALIDATE = "/sage.finetune.v1.FineTuneService/ValidateConfig"


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# -- RPCs ---------------------------------------------------------------------------------------------------------


def test_rpc_counts_are_kept_per_method_and_status_code() -> None:
    metrics = ServiceMetrics()
    metrics.observe_rpc(VALIDATE, "OK", 0.002)
    metrics.observe_rpc(VALIDATE, "OK", 0.004)
    metrics.observe_rpc(VALIDATE, "INVALID_ARGUMENT", 0.001)
    metrics.observe_rpc(TRAIN, "OK", 12.0)

    r = metrics.registry
    assert value(r, "finetune_rpc_requests_total", method=VALIDATE, code="OK") == 2
    assert value(r, "finetune_rpc_requests_total", method=VALIDATE, code="INVALID_ARGUMENT") == 1
    assert value(r, "finetune_rpc_requests_total", method=TRAIN, code="OK") == 1
    assert value(r, "finetune_rpc_requests_total", method=TRAIN, code="INVALID_ARGUMENT") is None


def test_rpc_latency_lands_in_the_right_buckets_per_method() -> None:
    metrics = ServiceMetrics()
    for seconds in (0.0005, 0.003, 0.003, 0.2, 45.0, 7200.0):
        metrics.observe_rpc(VALIDATE, "OK", seconds)
    metrics.observe_rpc(TRAIN, "OK", 100.0)

    r = metrics.registry

    def bucket(le: str, method: str = VALIDATE) -> float | None:
        return value(r, "finetune_rpc_duration_seconds_bucket", method=method, le=le)

    # Cumulative: le=0.001 holds 0.0005; le=0.005 adds the two 0.003; le=0.25 adds 0.2; 45 s needs le=60.
    assert [bucket(le) for le in ("0.001", "0.0025", "0.005", "0.25", "30.0", "60.0", "3600.0", "+Inf")] == [
        1, 1, 3, 4, 4, 5, 5, 6,
    ]  # fmt: skip
    assert value(r, "finetune_rpc_duration_seconds_count", method=VALIDATE) == 6
    assert value(r, "finetune_rpc_duration_seconds_sum", method=VALIDATE) == pytest.approx(7245.2065)
    assert bucket("60.0", TRAIN) == 0 and bucket("300.0", TRAIN) == 1, "methods have separate histograms"


def test_each_server_has_its_own_registry() -> None:
    first, second = ServiceMetrics(), ServiceMetrics()  # would raise "Duplicated timeseries" on a shared registry
    first.observe_rpc(VALIDATE, "OK", 0.01)
    assert value(first.registry, "finetune_rpc_requests_total", method=VALIDATE, code="OK") == 1
    assert value(second.registry, "finetune_rpc_requests_total", method=VALIDATE, code="OK") is None


# -- jobs by state ------------------------------------------------------------------------------------------------


def test_jobs_by_state_and_queue_length_are_read_from_the_callable_at_each_scrape() -> None:
    counts = {"QUEUED": 3, "RUNNING": 1, "SUCCEEDED": 7}
    calls = []

    def count_by_state() -> dict[str, int]:
        calls.append(1)
        return dict(counts)

    metrics = ServiceMetrics(count_by_state)
    text = metrics.exposition().decode()
    assert len(calls) == 1, "one store read per scrape"
    assert 'finetune_jobs{state="QUEUED"} 3.0' in text
    assert 'finetune_jobs{state="RUNNING"} 1.0' in text
    assert 'finetune_jobs{state="SUCCEEDED"} 7.0' in text
    assert 'finetune_jobs{state="FAILED"} 0.0' in text, "states without jobs are reported as 0"
    assert "finetune_queue_length 3.0" in text

    counts.update(QUEUED=0, RUNNING=2)
    r = metrics.registry
    assert value(r, "finetune_queue_length") == 0
    assert value(r, "finetune_jobs", state="RUNNING") == 2


def test_a_failing_count_drops_only_the_job_series() -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("the store is closed")

    metrics = ServiceMetrics(broken)
    metrics.observe_rpc(VALIDATE, "OK", 0.01)
    text = metrics.exposition().decode()  # does not raise: a scrape during shutdown still answers
    assert "finetune_rpc_requests_total" in text
    assert "finetune_queue_length " not in text and 'finetune_jobs{state="QUEUED"}' not in text


def test_store_state_counts_reads_a_real_store(tmp_path: Path) -> None:
    from finetune_server.storage.job_store import SqliteJobStore
    from finetune_server.storage.records import JobState

    with SqliteJobStore(tmp_path / "jobs.db") as store:
        for i in range(3):
            store.create_job(job_id=f"job-{i}", config={}, now=float(i))
        store.transition("job-0", JobState.RUNNING, now=10.0)
        store.transition("job-1", JobState.CANCELLED, now=10.0)
        assert store_state_counts(store)() == {
            "QUEUED": 1,
            "RUNNING": 1,
            "SUCCEEDED": 0,
            "FAILED": 0,
            "CANCELLED": 1,
        }


# -- running jobs -------------------------------------------------------------------------------------------------


def progress(step: int, elapsed: float, tokens_per_second: float = 100.0) -> dict[str, object]:
    return {"step": step, "total_steps": 100, "elapsed": elapsed, "tokens_per_second": tokens_per_second, "eta": None}


def test_steps_per_second_is_derived_from_successive_progress_events() -> None:
    metrics = ServiceMetrics()
    r = metrics.registry

    metrics.on_progress("job-a", progress(10, 4.0, tokens_per_second=512.0))
    assert value(r, "finetune_job_steps_per_second", job_id="job-a") == 2.5, "first event: the average so far"
    assert value(r, "finetune_job_tokens_per_second", job_id="job-a") == 512.0

    metrics.on_progress("job-a", progress(20, 6.0, tokens_per_second=640.0))
    assert value(r, "finetune_job_steps_per_second", job_id="job-a") == 5.0, "(20 - 10) / (6 - 4)"
    assert value(r, "finetune_job_tokens_per_second", job_id="job-a") == 640.0

    metrics.on_progress("job-a", progress(20, 6.0))  # the same point again: no division by zero, value kept
    assert value(r, "finetune_job_steps_per_second", job_id="job-a") == 5.0

    metrics.on_progress("job-a", progress(12, 8.0))  # a restarted worker went back to its checkpoint
    assert value(r, "finetune_job_steps_per_second", job_id="job-a") == 1.5, "12 / 8: a fresh start"


def test_job_gauges_are_per_job_and_disappear_when_the_job_ends() -> None:
    metrics = ServiceMetrics()
    r = metrics.registry
    metrics.on_progress("job-a", progress(4, 2.0, tokens_per_second=10.0))
    metrics.on_progress("job-b", progress(9, 3.0, tokens_per_second=20.0))
    assert value(r, "finetune_job_steps_per_second", job_id="job-a") == 2.0
    assert value(r, "finetune_job_steps_per_second", job_id="job-b") == 3.0

    metrics.job_ended("job-a")
    assert value(r, "finetune_job_steps_per_second", job_id="job-a") is None
    assert value(r, "finetune_job_tokens_per_second", job_id="job-a") is None
    assert 'job_id="job-a"' not in metrics.exposition().decode()
    assert value(r, "finetune_job_tokens_per_second", job_id="job-b") == 20.0, "other jobs stay"

    metrics.job_ended("job-a")  # twice, and for a job that never reported progress: no error
    metrics.job_ended("job-never-ran")

    metrics.on_progress("job-a", progress(6, 3.0))  # the same id running again starts a fresh baseline
    assert value(r, "finetune_job_steps_per_second", job_id="job-a") == 2.0


# -- TensorBoard --------------------------------------------------------------------------------------------------

MEMORY = DeviceMemoryReading(device="cpu", allocated_bytes=1, peak_bytes=1)


def progress_event(step: int, loss: float) -> ProgressEvent:
    return ProgressEvent(
        step=step,
        total_steps=10,
        epoch=step / 10,
        loss=loss,
        learning_rate=1e-3 / step,
        grad_norm=0.5 * step,
        tokens_per_second=100.0 * step,
        elapsed_s=float(step),
        eta_s=None,
        memory=MEMORY,
        tokens_seen=64 * step,
    )


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_sink_writes_train_and_eval_scalars_by_step(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    sink = tensorboard_sink(tmp_path / "tb")
    assert isinstance(sink, TensorBoardSink)
    for step in (1, 2, 3):
        sink(event_message(progress_event(step, loss=3.0 - step / 2)))
    sink(event_message(EvalEvent(step=2, eval_loss=2.25, perplexity=math.exp(2.25), is_best=True)))
    metrics = {"exact_match": 0.5, "token_accuracy": 0.75}  # held-out generation; a probes-only eval has no loss
    sink(event_message(EvalEvent(step=3, eval_loss=math.nan, perplexity=math.nan, is_best=False, metrics=metrics)))
    sink(
        event_message(CheckpointEvent(step=2, path="checkpoints/step-00000002", size_bytes=10))
    )  # not a scalar: ignored
    sink(event_message(LogEvent(LogLevel.INFO, "hello")))

    scalars = read_scalars(tmp_path / "tb")  # before close: each event is flushed as it comes
    assert set(scalars) == {
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_second",
        "eval/loss",
        "eval/exact_match",
        "eval/token_accuracy",
    }
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert [s for s, _ in scalars["train/learning_rate"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/learning_rate"]] == pytest.approx([1e-3, 5e-4, 1e-3 / 3])
    assert scalars["train/grad_norm"] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert scalars["train/tokens_per_second"] == [(1, 100.0), (2, 200.0), (3, 300.0)]
    assert scalars["eval/loss"] == [(2, 2.25)]  # no NaN point at 3
    assert scalars["eval/exact_match"] == [(3, 0.5)] and scalars["eval/token_accuracy"] == [(3, 0.75)]
    sink.close()
    sink(event_message(progress_event(4, loss=1.0)))  # after close: ignored, no error
    assert read_scalars(tmp_path / "tb")["train/loss"][-1] == (3, 1.5)


def test_a_resumed_attempt_replaces_the_points_after_its_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    first = tensorboard_sink(tmp_path / "tb")
    assert first is not None
    for step in (1, 2, 3, 4):  # checkpoint at 2, then the worker died at 4
        first(event_message(progress_event(step, loss=10.0 + step)))
    first.close()

    second = tensorboard_sink(tmp_path / "tb", resumed_from_step=2)
    assert second is not None
    for step in (3, 4, 5):
        second(event_message(progress_event(step, loss=float(step))))
    second.close()

    assert read_scalars(tmp_path / "tb")["train/loss"] == [(1, 11.0), (2, 12.0), (3, 3.0), (4, 4.0), (5, 5.0)]


def test_no_sink_without_tensorboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the optional extra were missing
    assert tensorboard_sink(tmp_path / "tb") is None
    assert not (tmp_path / "tb").exists()


def test_a_failing_writer_disables_the_sink_instead_of_failing_training(tmp_path: Path) -> None:
    class FullDisk:
        closed = False

        def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
            raise OSError(28, "No space left on device")

        def flush(self) -> None: ...

        def close(self) -> None:
            self.closed = True

    writer = FullDisk()
    sink = TensorBoardSink(writer, tmp_path)
    sink(event_message(progress_event(1, loss=1.0)))  # does not raise
    assert writer.closed
    sink(event_message(progress_event(2, loss=1.0)))  # and stays quiet afterwards
