"""One attempt over several Ray Train workers (DDP across nodes): `TorchTrainer` starts them and their process group
(gloo on CPU, NCCL on GPUs), each runs the training worker's `run` in its own process, and rank 0's messages reach the
attempt's actor through a Ray queue, in order, as they happen. Ray Train never retries (`max_failures=0`): a failed
attempt is reported like a crashed worker and the job service retries it from its newest checkpoint.

Stopping: every rank polls the attempt's actor; a cancel (or an actor that is gone) sets its stop flag, and the ranks
stop together between micro-steps. Ray owns the rank processes: they die with the actor that started them.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
import structlog
from ray.exceptions import GetTimeoutError, RayError
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Empty, Queue

from finetune_server.settings import RaySettings
from finetune_server.storage.layout import JobDir
from finetune_server.workers.process import read_log_tail
from finetune_server.workers.protocol import EXIT_CRASH, EXIT_ERROR, EXIT_OK, FINAL_MESSAGES, Error, Message, Started
from finetune_server.workers.supervisor import WorkerExit
from finetune_server.workers.train import WorkerSpec

STOP_POLL_S = 0.5
QUEUE_POLL_S = 0.5


class _QueueSink:
    """Rank 0's channel: each message onto the attempt's queue."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue

    def send(self, message: Message) -> None:
        self._queue.put(message)


class _NoSink:
    """The other ranks report nothing (the engine sends events on rank 0 only)."""

    def send(self, message: Message) -> None:
        return None


def _watch_attempt(attempt: Any, stop: threading.Event) -> None:
    """Set `stop` once the attempt's actor says it is cancelling, or cannot be asked any more."""
    while not stop.wait(STOP_POLL_S):
        try:
            if ray.get(attempt.stopping.remote(), timeout=30):
                break
        except (RayError, GetTimeoutError):
            break
    stop.set()


def _train_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the worker's `run`, its output appended to the job's worker log."""
    from ray import train as ray_train

    from finetune_server.observability.logging import configure_logging
    from finetune_server.workers import train as train_worker

    spec = WorkerSpec.from_dict(config["spec"])
    rank = ray_train.get_context().get_world_rank()
    log_fd = os.open(config["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log_fd, 1)  # this process serves this attempt only: its output belongs in the job's log
    os.dup2(log_fd, 2)
    configure_logging(os.environ.get("FINETUNE_LOG_LEVEL", "info"), json=True)
    log = structlog.get_logger(train_worker.__name__).bind(job_id=spec.job_id, rank=rank)
    stop = threading.Event()
    threading.Thread(target=_watch_attempt, args=(config["attempt"], stop), name="attempt-watch", daemon=True).start()
    sink = _QueueSink(config["queue"]) if rank == 0 else _NoSink()
    train_worker.run(spec, sink, stop, log, tensorboard=rank == 0)  # rank 0's final message tells how it ended


async def ddp_attempt(
    attempt: Any, spec: WorkerSpec, log_path: str, options: RaySettings
) -> AsyncIterator[Message | WorkerExit]:
    """Rank 0's messages as they come, then the attempt's WorkerExit (pid 0: no single process ran it)."""
    # Ray Train would also copy every print (structlog's lines) into its own log, doubling each line in the job's log.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # set here, it reaches every rank
    queue = Queue(actor_options={"num_cpus": 0})
    use_gpu = options.gpus_per_job > 0
    per_worker: dict[str, float] = {"CPU": options.cpus_per_job}
    if use_gpu:
        per_worker["GPU"] = options.gpus_per_job
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"spec": spec.to_dict(), "log_path": log_path, "queue": queue, "attempt": attempt},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=options.workers_per_job, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=f"attempt-{uuid.uuid4().hex[:8]}",
            storage_path=str(JobDir(Path(spec.output_dir)).ray_train),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    fit = asyncio.ensure_future(asyncio.to_thread(trainer.fit))
    started: Started | None = None
    final: Any = None
    failure = ""
    while True:
        try:
            item = await queue.get_async(timeout=QUEUE_POLL_S)
        except Empty:
            if not fit.done():
                continue
            try:
                item = await queue.get_async(block=False)  # what rank 0 sent just before the end
            except Empty:
                break
        if isinstance(item, Started):
            started = item
        elif isinstance(item, FINAL_MESSAGES) and final is None:
            final = item
        yield item
    try:
        fit.result()
    except Exception as exc:  # a rank raised or died: Ray Train reports it for the whole group
        lines = [line for line in str(exc).splitlines() if line.strip()]
        failure = f"a Ray Train worker failed: {lines[-1].strip() if lines else type(exc).__name__}"
    returncode = EXIT_CRASH if final is None else EXIT_ERROR if isinstance(final, Error) else EXIT_OK
    yield WorkerExit(
        pid=0,
        returncode=returncode,
        signal=None,
        final=final,
        log_tail=read_log_tail(Path(log_path)),
        started=started,
        cause=failure if final is None else "",
    )
