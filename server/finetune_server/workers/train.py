"""The training worker: trains one job attempt and reports to the server over a pipe (`protocol.py`).

A crash, an out-of-memory kill or a cancel of the worker never takes the server down, and its exit always frees the
device memory. Started as ``python -m finetune_server.workers.train --spec SPEC.json --events-fd N``; SPEC.json is
`WorkerSpec`. The server half is `supervisor.run_worker`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from finetune_server.host.allocator import settle_for_training
from finetune_server.host.cpu_policy import apply_in_worker
from finetune_server.workers.protocol import (
    EXIT_CRASH,
    EXIT_ERROR,
    EXIT_OK,
    Cancelled,
    Channel,
    Error,
    Event,
    MessageSink,
    Result,
    Spec,
    Started,
    exit_process,
    parse_worker_args,
    start_stdin_watch,
)

WORKER_MODULE = "finetune_server.workers.train"  # what the server starts with `python -m`


@dataclass(frozen=True)
class WorkerSpec(Spec):
    """Everything a worker needs to run one attempt of a job; JSON-able, written to SPEC.json."""

    job_id: str
    config: dict[str, Any]  # resolved TrainingConfig.to_dict()
    model_ref: str
    dataset_path: str
    output_dir: str
    eval_dataset_path: str | None = None
    hub_cache_dir: str | None = None
    hub_offline: bool | None = None
    device: str | None = None  # e.g. "cpu", "cuda:0"; None: the engine picks
    gpu_slot: int | None = None  # the job slot (the scheduler's number; slot k trains on the server's k-th GPU)
    cuda_visible_devices: str | None = None  # the slot's GPU as the worker's CUDA_VISIBLE_DEVICES (`gpu_slots`)
    data_dir: str | None = None  # adapter_location is reported relative to it when set
    cpu_threads: int | None = None  # torch/OpenMP threads; None: torch's default
    cpus: list[int] | None = None  # CPUs to run on; None: the server's
    token_cache_max_bytes: int | None = None  # the cap of the data dir's token cache; None: no cap
    # A continued job's first attempts: the adapter folder it starts from, and the checkpoint folder whose optimizer
    # state it continues (resume_optimizer); None once it has a checkpoint of its own, which it resumes instead.
    init_adapter_dir: str | None = None
    init_optimizer_dir: str | None = None


def event_message(event: Any) -> Event:
    """A training-loop event as the protocol's Event (contract field names, durations in seconds)."""
    from finetune_server.training.engine.events import CheckpointEvent, EvalEvent, LogEvent, ProgressEvent

    if isinstance(event, ProgressEvent):
        data: dict[str, Any] = {
            "step": event.step,
            "total_steps": event.total_steps,
            "epoch": event.epoch,
            "loss": event.loss,
            "learning_rate": event.learning_rate,
            "grad_norm": event.grad_norm,
            "tokens_per_second": event.tokens_per_second,
            "elapsed": event.elapsed_s,
            "eta": event.eta_s,
            "memory": dataclasses.asdict(event.memory),
            "tokens_seen": event.tokens_seen,
        }
        kind = "progress"
    elif isinstance(event, EvalEvent):
        data = dataclasses.asdict(event)
        kind = "eval"
    elif isinstance(event, CheckpointEvent):
        data = dataclasses.asdict(event)
        kind = "checkpoint"
    elif isinstance(event, LogEvent):
        data = {"level": event.level.name, "message": event.message}
        kind = "log"
    else:  # a newer engine event this worker does not know: say so rather than crash the job
        data = {"level": "DEBUG", "message": f"unreported event {type(event).__name__}"}
        kind = "log"
    return Event(kind=kind, data=data)


def _result(outcome: Any, data_dir: str | None) -> Result:
    """The final message of a finished run (a TrainingOutcome), durations in seconds."""
    return Result(
        data={
            "final_train_loss": outcome.final_train_loss,
            "final_eval_loss": outcome.final_eval_loss,
            "steps": outcome.steps,
            "trained_tokens": outcome.trained_tokens,
            "train_runtime": outcome.train_runtime_s,
            "metrics": outcome.metrics,
            "adapter_location": _adapter_location(outcome.adapter_dir, data_dir),
            "stopped_early": outcome.stopped_early,
            "probes": [dataclasses.asdict(p) for p in outcome.probes],
        }
    )


def _adapter_location(adapter_dir: Path, data_dir: str | None) -> str:
    if data_dir:
        with contextlib.suppress(ValueError):
            return str(adapter_dir.resolve().relative_to(Path(data_dir).resolve()))
    return str(adapter_dir)


def run(spec: WorkerSpec, channel: MessageSink, stop: threading.Event, log: Any, *, tensorboard: bool = True) -> int:
    """Train one attempt and send the final message; returns the exit code (typed errors included).

    `tensorboard`: whether this process writes the job's TensorBoard files (only one rank of a DDP attempt does)."""
    # Heavy imports here, not at module level: the supervisor imports WorkerSpec without torch.
    from finetune_server.errors import FinetuneError
    from finetune_server.observability.tensorboard import tensorboard_sink
    from finetune_server.storage.layout import DataDir, JobDir
    from finetune_server.training.config import TrainingConfig
    from finetune_server.training.data.token_cache import TokenCache
    from finetune_server.training.engine.checkpoint import list_checkpoints
    from finetune_server.training.engine.errors import TrainingCancelled
    from finetune_server.training.engine.recipe import run_training

    output_dir = Path(spec.output_dir)
    checkpoints = list_checkpoints(output_dir)
    resumed_from = checkpoints[-1][0] if checkpoints else None
    channel.send(Started(resumed_from_step=resumed_from, pid=os.getpid()))
    log.info(
        "worker started",
        resumed_from_step=resumed_from,
        pid=os.getpid(),
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),  # set by its executor: a slot, or Ray's GPUs
    )
    if stop.is_set():  # cancelled (or orphaned) while importing: do not load the model at all
        channel.send(Cancelled(step=resumed_from or 0))
        return EXIT_OK
    # None: not installed, or not this rank's job
    board = tensorboard_sink(JobDir(output_dir).tensorboard, resumed_from_step=resumed_from) if tensorboard else None

    def on_event(event: Any) -> None:
        message = event_message(event)
        channel.send(message)
        if board is not None:
            board(message)

    try:
        outcome = run_training(
            TrainingConfig.from_dict(spec.config),
            model_ref=spec.model_ref,
            dataset_path=spec.dataset_path,
            eval_dataset_path=spec.eval_dataset_path,
            output_dir=output_dir,
            on_event=on_event,
            should_stop=stop.is_set,
            device=spec.device,
            job_id=spec.job_id,
            hub_cache_dir=Path(spec.hub_cache_dir) if spec.hub_cache_dir else None,
            hub_offline=spec.hub_offline,
            token_cache=TokenCache(DataDir(Path(spec.data_dir)).token_cache, spec.token_cache_max_bytes)
            if spec.data_dir
            else None,
            init_adapter_dir=Path(spec.init_adapter_dir) if spec.init_adapter_dir else None,
            init_optimizer_dir=Path(spec.init_optimizer_dir) if spec.init_optimizer_dir else None,
        )
    except TrainingCancelled as exc:
        log.info("training cancelled", step=exc.step)
        channel.send(Cancelled(step=exc.step))
        return EXIT_OK
    except FinetuneError as exc:
        log.warning("training failed", reason=exc.reason, error=exc.message, step=getattr(exc, "step", 0))
        channel.send(Error.from_exception(exc))
        return EXIT_ERROR
    finally:
        if board is not None:
            board.close()
    channel.send(_result(outcome, spec.data_dir))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_worker_args(WORKER_MODULE, "Run one fine-tuning job attempt.", argv)
    spec = WorkerSpec.read(args.spec)
    apply_in_worker(spec.cpu_threads, spec.cpus)  # before torch is imported
    settle_for_training(bool(spec.config.get("gradient_checkpointing")))
    log = structlog.get_logger(__name__).bind(job_id=spec.job_id)
    stop = threading.Event()
    channel = Channel.open(args.events_fd, stop)
    start_stdin_watch(stop, log)
    try:
        code = run(spec, channel, stop, log)
    except Exception:
        log.exception("worker crashed")
        code = EXIT_CRASH
    channel.close()
    return code


if __name__ == "__main__":
    exit_process(main())
