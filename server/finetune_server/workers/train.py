"""The worker process: trains one job attempt and reports to the server over a pipe.

A crash, an out-of-memory kill or a cancel of the worker never takes the server down, and its exit always frees the
device memory. The server half is `supervisor.py`.

Protocol
--------
Started as ``python -m finetune_server.workers.train --spec SPEC.json --events-fd N`` in its own process group.

SPEC.json (written by the supervisor into the job's output folder) is `WorkerSpec` as JSON: job_id, config (the
RESOLVED TrainingConfig as a dict), model_ref, dataset_path, eval_dataset_path, output_dir, hub_cache_dir,
hub_offline, device, gpu_slot (already applied as CUDA_VISIBLE_DEVICES by the supervisor), data_dir (the result's
adapter_location is relative to it when set), cpu_threads and cpus (applied by the worker before it imports torch).

The worker writes one JSON object per line to fd N, flushed after every line. Never stdout: libraries print there.

- ``{"type": "started", "resumed_from_step": int | null, "pid": int}`` once, after the imports, before training.
- ``{"type": "event", "kind": "progress" | "eval" | "checkpoint" | "log", "data": {...}}``, data keyed by the
  contract's field names: TrainingProgress (step, total_steps, epoch, loss, learning_rate, grad_norm,
  tokens_per_second, elapsed and eta in seconds (eta may be null), memory {device, allocated_bytes, peak_bytes,
  reserved_bytes}, tokens_seen), EvalResult (step, eval_loss, perplexity, is_best), CheckpointSaved (step, path
  relative to the output folder, size_bytes), LogLine (level "DEBUG" | "INFO" | "WARNING" | "ERROR", message).
- then exactly one final message:
  ``{"type": "result", "data": {final_train_loss, final_eval_loss, steps, trained_tokens, train_runtime (seconds),
  metrics, adapter_location, stopped_early}}`` and exit 0;
  ``{"type": "cancelled", "step": k}`` and exit 0;
  ``{"type": "error", "reason", "message", "hint", "step", "kind"}`` and exit 1, for typed errors (FinetuneError;
  `kind` is its ErrorKind value).
  Anything else (an unexpected exception) is logged with its traceback to stderr and exits 2 with no final message:
  the supervisor treats it, like a death by signal, as a crash.

Floats are written as Python's json writes them (NaN and Infinity included: a perplexity may be infinite).

stdin: a line ``cancel`` sets the stop flag; EOF on stdin (the server died) sets it too, so an orphaned worker never
keeps training beside a restarted server. Training stops between micro-steps (`TrainingCancelled`), keeping the
checkpoints already written; the next attempt resumes from the newest one.

stdout and stderr go to the job's log file; structlog writes JSON lines to stderr, bound with job_id.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import structlog

from finetune_server.host.cpu_policy import apply_in_worker

WORKER_MODULE = "finetune_server.workers.train"
EXIT_OK = 0  # result or cancelled
EXIT_ERROR = 1  # typed error, reported
EXIT_CRASH = 2  # unexpected exception, not reported


@dataclass(frozen=True)
class WorkerSpec:
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
    gpu_slot: int | None = None  # host GPU index -> CUDA_VISIBLE_DEVICES (set by the supervisor, not the worker)
    data_dir: str | None = None  # adapter_location is reported relative to it when set
    cpu_threads: int | None = None  # torch/OpenMP threads; None: torch's default
    cpus: list[int] | None = None  # CPUs to run on; None: the server's

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, path: Path) -> Path:
        """Write atomically (temp file + rename), so a worker never reads half a spec."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        temp.replace(path)
        return path

    @classmethod
    def read(cls, path: Path) -> WorkerSpec:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


class Channel:
    """The events pipe. A broken pipe means the server is gone: stop training and drop further messages."""

    def __init__(self, stream: IO[str], stop: threading.Event) -> None:
        self._stream = stream
        self._stop = stop
        self._lock = threading.Lock()
        self.broken = False

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":")) + "\n"
        with self._lock:
            if self.broken:
                return
            try:
                self._stream.write(line)
                self._stream.flush()
            except OSError:  # BrokenPipeError and friends
                self.broken = True
                self._stop.set()

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._stream.close()


def watch_stdin(stdin: IO[str], stop: threading.Event, log: Any) -> None:
    """Set `stop` on a "cancel" line or on EOF (the server died); runs in a daemon thread."""
    try:
        for line in stdin:
            if line.strip() == "cancel":
                log.info("cancel requested")
                stop.set()
    except (OSError, ValueError):
        pass
    if not stop.is_set():
        log.warning("stdin closed: the server is gone, stopping")
    stop.set()


def event_message(event: Any) -> dict[str, Any]:
    """A training-loop event as the protocol's "event" message (contract field names, durations in seconds)."""
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
    return {"type": "event", "kind": kind, "data": data}


def error_message(exc: Any) -> dict[str, Any]:
    return {
        "type": "error",
        "reason": exc.reason,
        "message": exc.message,
        "hint": exc.hint,
        "step": int(getattr(exc, "step", 0) or 0),
        "kind": exc.kind.value,
    }


def _adapter_location(adapter_dir: Path, data_dir: str | None) -> str:
    if data_dir:
        with contextlib.suppress(ValueError):
            return str(adapter_dir.resolve().relative_to(Path(data_dir).resolve()))
    return str(adapter_dir)


def run(spec: WorkerSpec, channel: Channel, stop: threading.Event, log: Any) -> int:
    """Train one attempt and send the final message; returns the exit code (typed errors included)."""
    # Heavy imports here, not at module level: the supervisor imports WorkerSpec without torch.
    from finetune_server.errors import FinetuneError
    from finetune_server.observability.tensorboard import tensorboard_sink
    from finetune_server.storage.layout import JobDir
    from finetune_server.training.config import TrainingConfig
    from finetune_server.training.engine.checkpoint import list_checkpoints
    from finetune_server.training.engine.errors import TrainingCancelled
    from finetune_server.training.engine.recipe import run_training

    output_dir = Path(spec.output_dir)
    checkpoints = list_checkpoints(output_dir)
    resumed_from = checkpoints[-1][0] if checkpoints else None
    channel.send({"type": "started", "resumed_from_step": resumed_from, "pid": os.getpid()})
    log.info("worker started", resumed_from_step=resumed_from, pid=os.getpid())
    if stop.is_set():  # cancelled (or orphaned) while importing: do not load the model at all
        channel.send({"type": "cancelled", "step": resumed_from or 0})
        return EXIT_OK
    tensorboard = tensorboard_sink(
        JobDir(output_dir).tensorboard, resumed_from_step=resumed_from
    )  # None: not installed

    def on_event(event: Any) -> None:
        channel.send(event_message(event))
        if tensorboard is not None:
            tensorboard(event)

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
        )
    except TrainingCancelled as exc:
        log.info("training cancelled", step=exc.step)
        channel.send({"type": "cancelled", "step": exc.step})
        return EXIT_OK
    except FinetuneError as exc:
        log.warning("training failed", reason=exc.reason, error=exc.message, step=getattr(exc, "step", 0))
        channel.send(error_message(exc))
        return EXIT_ERROR
    finally:
        if tensorboard is not None:
            tensorboard.close()
    channel.send(
        {
            "type": "result",
            "data": {
                "final_train_loss": outcome.final_train_loss,
                "final_eval_loss": outcome.final_eval_loss,
                "steps": outcome.steps,
                "trained_tokens": outcome.trained_tokens,
                "train_runtime": outcome.train_runtime_s,
                "metrics": outcome.metrics,
                "adapter_location": _adapter_location(outcome.adapter_dir, spec.data_dir),
                "stopped_early": outcome.stopped_early,
            },
        }
    )
    return EXIT_OK


def parse_worker_args(module: str, description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line every worker module takes (see supervisor.module_command); also sets up JSON logs."""
    parser = argparse.ArgumentParser(prog=module, description=description)
    parser.add_argument("--spec", required=True, type=Path, help="the SPEC.json written by the server")
    parser.add_argument("--events-fd", required=True, type=int, help="inherited fd for protocol messages")
    parser.add_argument("--log-level", default=os.environ.get("FINETUNE_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)

    from finetune_server.observability.logging import configure_logging

    configure_logging(args.log_level, json=True)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_worker_args(WORKER_MODULE, "Run one fine-tuning job attempt.", argv)
    spec = WorkerSpec.read(args.spec)
    apply_in_worker(spec.cpu_threads, spec.cpus)  # before torch is imported
    log = structlog.get_logger(__name__).bind(job_id=spec.job_id)
    stop = threading.Event()
    channel = Channel(os.fdopen(args.events_fd, "w", encoding="utf-8"), stop)
    threading.Thread(target=watch_stdin, args=(sys.stdin, stop, log), name="stdin-watch", daemon=True).start()
    try:
        code = run(spec, channel, stop, log)
    except Exception:
        log.exception("worker crashed")
        code = EXIT_CRASH
    channel.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
