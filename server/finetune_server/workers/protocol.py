"""The worker protocol: how the server starts a worker, what the worker sends back, how it ends, and how it is stopped.

Both workers (`train.py`, `export.py`) speak it; the server half is `supervisor.py`. This module never imports torch.

Start
-----
``python -m MODULE --spec SPEC.json --events-fd N`` (`module_command`), in its own process group, stdout and stderr
to a log file (structlog writes JSON lines to stderr, bound with the job id). SPEC.json is the worker's spec (a
`Spec`: `WorkerSpec` for training, `ExportSpec` for an export) as JSON, written atomically by the server; a worker
ignores keys it does not know.

Messages
--------
The worker writes one JSON object per line to fd N, flushed after every line; never stdout, libraries print there.
Floats are written as Python's json writes them (NaN and Infinity included: a perplexity may be infinite).

Training worker:

- ``{"type": "started", "resumed_from_step": int | null, "pid": int}`` once, after the imports, before training.
- ``{"type": "event", "kind": "progress" | "eval" | "checkpoint" | "log", "data": {...}}``, data keyed by the
  contract's field names: TrainingProgress (step, total_steps, epoch, loss, learning_rate, grad_norm,
  tokens_per_second, elapsed and eta in seconds (eta may be null), memory {device, allocated_bytes, peak_bytes,
  reserved_bytes}, tokens_seen), EvalResult (step, eval_loss (NaN without an eval set), perplexity, is_best,
  metrics {name: float}, probes [{index, prompt, answer, expected, exact_match}]), CheckpointSaved (step, path
  relative to the output folder, size_bytes), LogLine (level "DEBUG" | "INFO" | "WARNING" | "ERROR", message).
- then exactly one final message: ``{"type": "result", "data": {final_train_loss, final_eval_loss, steps,
  trained_tokens, train_runtime (seconds), metrics, adapter_location, stopped_early, probes [{index, prompt,
  expected, before, after, before_exact_match, after_exact_match}]}}`` and exit 0, or
  ``{"type": "cancelled", "step": k}`` and exit 0, or an error (below) and exit 1.

Export worker:

- ``{"type": "progress", "stage", "fraction", "message"}``, stages `loading_base`, `merging`, `saving`,
  `checksumming`, fraction in [0, 1];
- then exactly one final message: ``{"type": "artifact", "data": ArtifactManifest.to_dict()}`` and exit 0, or an
  error and exit 1.

Generation worker (long-lived: one model, many requests; `generate.py`):

- ``{"type": "ready", "context_length": int, "step": int}`` once, when the model is loaded;
- per request: ``{"type": "text", "text": str}`` pieces, then ``{"type": "done", "finish_reason": "eos" |
  "max_tokens" | "stop" | "cancelled", "prompt_tokens": int, "completion_tokens": int}``, or instead
  ``{"type": "refused", "error": {reason, message, hint, step, kind, metadata, violations}}`` for a request it
  cannot answer (violations: [{field, reason, message}]);
- a failure to load the model is an error (below) and exit 1; EOF of stdin ends it with exit 0.

Both: ``{"type": "error", "reason", "message", "hint", "step", "kind", "metadata"}`` for a typed error (a
FinetuneError: `kind` is its ErrorKind value, `step` the training step it happened at, 0 when it has none). A reader
takes a missing `step` as 0 and a missing `metadata` as empty, and ignores keys it does not know, so workers and
servers of different versions understand each other. Anything else (an unexpected exception) is logged with its
traceback to stderr and exits 2 with no final message: the server treats it, like a death by signal, as a crash.

A line that is not a JSON object, has an unknown "type" or lacks what its type needs is a protocol breach: `decode`
raises ValueError and the server logs and drops the line.

Stopping
--------
The training worker reads stdin: a line ``cancel`` sets its stop flag, and so does EOF (the server, or the Ray
actor that started it, died), so an orphaned worker never keeps training beside a restarted server (`watch_stdin`);
one still running `ORPHAN_EXIT_S` after EOF exits by itself. Training stops between micro-steps, keeping the
checkpoints already written; the next attempt resumes from the newest one. The server escalates to SIGTERM, then
SIGKILL, of the process group. The export worker has no stdin: stopping it means killing its group.
The generation worker reads one JSON request per line (`GenerateCommand`); a line ``cancel`` stops the generation in
progress at its next token (it then sends ``done`` with `cancelled`) and EOF makes it exit once that is done.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, NoReturn, Protocol, Self

from finetune_server.errors import ErrorKind, FinetuneError, Violation

EXIT_OK = 0  # a final message that is not an error: result, cancelled, artifact
EXIT_ERROR = 1  # a typed error, reported
EXIT_CRASH = 2  # an unexpected exception, not reported
EVENT_KINDS = frozenset({"progress", "eval", "checkpoint", "log"})
ORPHAN_EXIT_S = 30.0  # how long a worker whose stdin closed may take to stop by itself before it exits anyway


# --- messages --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One line of the protocol. `TYPE` is its "type"; the fields, in order, are its other keys."""

    TYPE: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def encode(self) -> str:
        """The message as one JSON line."""
        return json.dumps(self.to_dict(), separators=(",", ":")) + "\n"


@dataclass(frozen=True)
class Started(Message):
    """The training worker is up (imports done) and about to train; `pid` is its process group id."""

    TYPE: ClassVar[str] = "started"
    resumed_from_step: int | None
    pid: int


@dataclass(frozen=True)
class Event(Message):
    """A training event: `kind` is one of EVENT_KINDS, `data` the contract's message as a dict."""

    TYPE: ClassVar[str] = "event"
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class ExportProgress(Message):
    TYPE: ClassVar[str] = "progress"
    stage: str
    fraction: float
    message: str


@dataclass(frozen=True)
class Result(Message):
    """Training finished: `data` is the job's result (final losses, steps, adapter_location, ...)."""

    TYPE: ClassVar[str] = "result"
    data: dict[str, Any]


@dataclass(frozen=True)
class Artifact(Message):
    """The export finished: `data` is its ArtifactManifest.to_dict()."""

    TYPE: ClassVar[str] = "artifact"
    data: dict[str, Any]


@dataclass(frozen=True)
class Cancelled(Message):
    """Training stopped on request at `step`, its checkpoints kept."""

    TYPE: ClassVar[str] = "cancelled"
    step: int


@dataclass(frozen=True)
class Error(Message):
    """A typed failure: a FinetuneError as it crosses the pipe."""

    TYPE: ClassVar[str] = "error"
    reason: str
    message: str
    hint: str = ""
    step: int = 0
    kind: str = ErrorKind.FAILED_PRECONDITION.value
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: FinetuneError) -> Error:
        return cls(
            reason=exc.reason,
            message=exc.message,
            hint=exc.hint,
            step=int(getattr(exc, "step", 0) or 0),  # training errors say at which step
            kind=exc.kind.value,
            metadata=dict(exc.metadata),
        )

    def to_exception(self) -> FinetuneError:
        """The FinetuneError again; a kind this server does not know becomes FAILED_PRECONDITION."""
        try:
            kind = ErrorKind(self.kind)
        except ValueError:
            kind = ErrorKind.FAILED_PRECONDITION
        return FinetuneError(kind, self.reason, self.message, hint=self.hint, metadata=dict(self.metadata))


@dataclass(frozen=True)
class GenerateReady(Message):
    """The generation worker has its model loaded: `context_length` tokens (0: unknown), the adapter's `step`."""

    TYPE: ClassVar[str] = "ready"
    context_length: int
    step: int


@dataclass(frozen=True)
class GeneratedText(Message):
    """The next piece of an answer's text."""

    TYPE: ClassVar[str] = "text"
    text: str


@dataclass(frozen=True)
class GenerateDone(Message):
    """One generation ended: `finish_reason` is one of FINISH_REASONS; the worker waits for the next request."""

    TYPE: ClassVar[str] = "done"
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerateRefused(Message):
    """One request was refused (its prompt does not fit, ...): `error` holds an Error's fields; the worker goes on."""

    TYPE: ClassVar[str] = "refused"
    error: dict[str, Any]

    @classmethod
    def from_exception(cls, exc: FinetuneError) -> GenerateRefused:
        fields = Error.from_exception(exc).to_dict()
        fields.pop("type")
        fields["violations"] = [dataclasses.asdict(v) for v in exc.violations]  # the request fields at fault
        return cls(error=fields)

    def to_exception(self) -> FinetuneError:
        error = _error({**self.error, "type": Error.TYPE}).to_exception()
        error.violations = [
            Violation(str(v.get("field", "")), str(v.get("reason", "")), str(v.get("message", "")))
            for v in self.error.get("violations") or []
            if isinstance(v, dict)
        ]
        return error


FINISH_REASONS = frozenset({"eos", "max_tokens", "stop", "cancelled"})
FinalMessage = Result | Cancelled | Error | Artifact  # exactly one of these ends a worker that was not killed
FINAL_MESSAGES = (Result, Cancelled, Error, Artifact)


# --- decoding: every field checked, so a consumer never meets a malformed message ------------------------------------


def _get(data: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], default: Any = ...) -> Any:
    """`data[key]`, checked to be of `kinds`; `default` (when given) stands in for a missing key or a null."""
    value = data.get(key)
    if value is None:
        if default is ...:
            raise ValueError(f"the {data.get('type')!r} message needs {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, kinds):  # no field is a bool; json's true is not an int here
        raise ValueError(f"{key!r} of the {data.get('type')!r} message is a {type(value).__name__}")
    return value


def _started(data: Mapping[str, Any]) -> Started:
    return Started(resumed_from_step=_get(data, "resumed_from_step", int, None), pid=_get(data, "pid", int))


def _event(data: Mapping[str, Any]) -> Event:
    kind = _get(data, "kind", str)
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    return Event(kind=kind, data=_get(data, "data", dict))


def _progress(data: Mapping[str, Any]) -> ExportProgress:
    fraction = float(_get(data, "fraction", (int, float)))
    return ExportProgress(stage=_get(data, "stage", str), fraction=fraction, message=_get(data, "message", str, ""))


def _error(data: Mapping[str, Any]) -> Error:
    metadata = _get(data, "metadata", dict, {})
    return Error(
        reason=_get(data, "reason", str),
        message=_get(data, "message", str),
        hint=_get(data, "hint", str, ""),
        step=_get(data, "step", int, 0),
        kind=_get(data, "kind", str, ErrorKind.FAILED_PRECONDITION.value),
        metadata={str(k): str(v) for k, v in metadata.items()},
    )


def _done(data: Mapping[str, Any]) -> GenerateDone:
    reason = _get(data, "finish_reason", str)
    if reason not in FINISH_REASONS:
        raise ValueError(f"unknown finish reason {reason!r}")
    return GenerateDone(
        finish_reason=reason,
        prompt_tokens=_get(data, "prompt_tokens", int),
        completion_tokens=_get(data, "completion_tokens", int),
    )


def _refused(data: Mapping[str, Any]) -> GenerateRefused:
    error = _get(data, "error", dict)
    _error({**error, "type": Error.TYPE})  # checked as an error's fields
    return GenerateRefused(error=dict(error))


_DECODERS: dict[str, Callable[[Mapping[str, Any]], Message]] = {
    GenerateReady.TYPE: lambda data: GenerateReady(
        context_length=_get(data, "context_length", int), step=_get(data, "step", int)
    ),
    GeneratedText.TYPE: lambda data: GeneratedText(text=_get(data, "text", str)),
    GenerateDone.TYPE: _done,
    GenerateRefused.TYPE: _refused,
    Started.TYPE: _started,
    Event.TYPE: _event,
    ExportProgress.TYPE: _progress,
    Result.TYPE: lambda data: Result(data=_get(data, "data", dict)),
    Artifact.TYPE: lambda data: Artifact(data=_get(data, "data", dict)),
    Cancelled.TYPE: lambda data: Cancelled(step=_get(data, "step", int)),
    Error.TYPE: _error,
}


def decode(data: Any) -> Message:
    """The typed message of one decoded JSON value; ValueError when it is not a message of this protocol."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    kind = data.get("type")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise ValueError(f"unknown message type {kind!r}")
    return decoder(data)


def decode_line(line: bytes | str) -> Message:
    """One protocol line as its message; ValueError (json's included) for anything else."""
    return decode(json.loads(line))


# --- specs -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """The base of a worker's spec: JSON-able fields, written by the server, read by the worker."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Keys this version does not know are ignored (a newer server may send more); a missing one is a TypeError."""
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
    def read(cls, path: Path) -> Self:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# --- the worker's side -----------------------------------------------------------------------------------------------


class MessageSink(Protocol):
    """Where a worker's messages go: the events pipe (`Channel`), or a cluster executor's queue."""

    def send(self, message: Message) -> None: ...


class Channel:
    """The events pipe. A broken pipe means the server is gone: set `stop` and drop further messages."""

    def __init__(self, stream: IO[str], stop: threading.Event) -> None:
        self._stream = stream
        self._stop = stop
        self._lock = threading.Lock()
        self.broken = False

    @classmethod
    def open(cls, fd: int, stop: threading.Event) -> Channel:
        return cls(os.fdopen(fd, "w", encoding="utf-8"), stop)

    def send(self, message: Message) -> None:
        line = message.encode()
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


def watch_stdin(stdin: IO[str], stop: threading.Event, log: Any, orphan_exit_s: float = ORPHAN_EXIT_S) -> None:
    """Set `stop` on a "cancel" line or on EOF (the server, or the Ray actor that started us, died); runs in a
    daemon thread. After EOF nobody will escalate: a worker still running `orphan_exit_s` later (stuck in a long
    step or a save) exits by itself, so no orphan keeps a GPU. A worker that ends in time never gets there."""
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
    time.sleep(orphan_exit_s)
    log.error("stdin closed and still running: exiting", waited_s=orphan_exit_s)
    os._exit(EXIT_CRASH)


def exit_process(code: int) -> NoReturn:
    """End this worker process with `code` now, skipping the interpreter's teardown.

    By the time a worker's `main` returns, what it wrote is closed (its message channel, log, checkpoints, board);
    all that is left is Python unloading torch, transformers and peft, ~2.5 s of a core that its supervisor waits for
    before it can report the job's end. Forked and fresh workers (and the fork server) end the same way."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken log must not change the exit code
            stream.flush()
    os._exit(code)


def start_stdin_watch(stop: threading.Event, log: Any) -> None:
    threading.Thread(target=watch_stdin, args=(sys.stdin, stop, log), name="stdin-watch", daemon=True).start()


# --- the command line ------------------------------------------------------------------------------------------------


def module_command(module: str, spec_path: Path, events_fd: int) -> list[str]:
    """How every worker module is started fresh: its spec file and the inherited fd its messages go to."""
    return [sys.executable, "-m", module, *worker_args(spec_path, str(events_fd))]


def worker_args(spec_path: Path, events_fd: str) -> list[str]:
    """The arguments of every worker module's `main`, started fresh or forked (`forkserver.py`)."""
    return ["--spec", str(spec_path), "--events-fd", events_fd]


def parse_worker_args(module: str, description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line every worker module takes (see `module_command`); also sets up JSON logs."""
    parser = argparse.ArgumentParser(prog=module, description=description)
    parser.add_argument("--spec", required=True, type=Path, help="the SPEC.json written by the server")
    parser.add_argument("--events-fd", required=True, type=int, help="inherited fd for protocol messages")
    parser.add_argument("--log-level", default=os.environ.get("FINETUNE_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)

    from finetune_server.observability.logging import configure_logging

    configure_logging(args.log_level, json=True)
    return args
