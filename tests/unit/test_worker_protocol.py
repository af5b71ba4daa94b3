"""The worker protocol without a worker: the exact wire format, decoding, specs and the events pipe (no torch)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog

from finetune_server.errors import ErrorKind, FinetuneError, field_error
from finetune_server.training.engine.errors import NanLossError
from finetune_server.workers import export as export_worker
from finetune_server.workers import generate as generate_worker
from finetune_server.workers import train as train_worker
from finetune_server.workers.export import ExportSpec
from finetune_server.workers.process import read_messages
from finetune_server.workers.protocol import (
    EXIT_CRASH,
    Artifact,
    Cancelled,
    Channel,
    Error,
    Event,
    ExportProgress,
    GenerateDone,
    GeneratedText,
    GenerateReady,
    GenerateRefused,
    Message,
    Result,
    Started,
    decode,
    decode_line,
)
from finetune_server.workers.train import WorkerSpec

# Each message and the line today's (and yesterday's) workers write for it: the wire format is pinned here.
WIRE: list[tuple[Message, dict[str, Any]]] = [
    (Started(resumed_from_step=None, pid=42), {"type": "started", "resumed_from_step": None, "pid": 42}),
    (Started(resumed_from_step=4, pid=42), {"type": "started", "resumed_from_step": 4, "pid": 42}),
    (
        Event(kind="log", data={"level": "INFO", "message": "hi"}),
        {"type": "event", "kind": "log", "data": {"level": "INFO", "message": "hi"}},
    ),
    (
        ExportProgress(stage="merging", fraction=0.35, message="applying the adapter"),
        {"type": "progress", "stage": "merging", "fraction": 0.35, "message": "applying the adapter"},
    ),
    (
        Result(data={"steps": 6, "adapter_location": "a"}),
        {"type": "result", "data": {"steps": 6, "adapter_location": "a"}},
    ),
    (
        Artifact(data={"format": "adapter", "files": []}),
        {"type": "artifact", "data": {"format": "adapter", "files": []}},
    ),
    (Cancelled(step=3), {"type": "cancelled", "step": 3}),
    (GenerateReady(context_length=2048, step=6), {"type": "ready", "context_length": 2048, "step": 6}),
    (GeneratedText(text="Paris"), {"type": "text", "text": "Paris"}),
    (
        GenerateDone(finish_reason="eos", prompt_tokens=13, completion_tokens=4),
        {"type": "done", "finish_reason": "eos", "prompt_tokens": 13, "completion_tokens": 4},
    ),
    (
        Error(reason="NAN_LOSS", message="m", hint="h", step=2, kind="FAILED_PRECONDITION", metadata={"step": "2"}),
        {
            "type": "error",
            "reason": "NAN_LOSS",
            "message": "m",
            "hint": "h",
            "step": 2,
            "kind": "FAILED_PRECONDITION",
            "metadata": {"step": "2"},
        },
    ),
]


@pytest.mark.parametrize(("message", "wire"), WIRE, ids=lambda v: getattr(v, "TYPE", ""))
def test_messages_keep_their_wire_format_and_round_trip(message: Message, wire: dict[str, Any]) -> None:
    line = message.encode()
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert json.loads(line) == wire and list(json.loads(line)) == list(wire)  # the same keys, in the same order
    assert decode_line(line) == message
    assert decode(wire) == message


def test_infinite_and_nan_floats_cross_the_pipe() -> None:
    line = Event(kind="eval", data={"step": 1, "perplexity": math.inf, "eval_loss": math.nan}).encode()
    decoded = decode_line(line)
    assert isinstance(decoded, Event) and decoded.data["perplexity"] == math.inf
    assert math.isnan(decoded.data["eval_loss"])


def test_error_lines_of_either_worker_before_the_shared_payload_still_decode() -> None:
    training = {"type": "error", "reason": "NAN_LOSS", "message": "m", "hint": "h", "step": 5, "kind": "OUT_OF_RANGE"}
    export = {"type": "error", "reason": "ADAPTER_NOT_FOUND", "message": "m", "hint": "", "kind": "NOT_FOUND"}
    export["metadata"] = {"job": "j"}
    assert decode(training) == Error("NAN_LOSS", "m", "h", step=5, kind="OUT_OF_RANGE", metadata={})
    assert decode(export) == Error("ADAPTER_NOT_FOUND", "m", "", step=0, kind="NOT_FOUND", metadata={"job": "j"})
    # Keys a newer worker may add are ignored.
    assert decode({"type": "cancelled", "step": 1, "reason": "user"}) == Cancelled(step=1)


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        (b"not json", "Expecting value"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"no": "type"}', "unknown message type None"),
        (b'{"type": "telemetry", "x": 1}', "unknown message type 'telemetry'"),
        (b'{"type": "started", "resumed_from_step": null}', "needs 'pid'"),
        (b'{"type": "started", "pid": "42"}', "'pid' of the 'started' message is a str"),
        (b'{"type": "cancelled", "step": true}', "'step' of the 'cancelled' message is a bool"),
        (b'{"type": "event", "kind": "progress", "data": [1]}', "'data' of the 'event' message is a list"),
        (b'{"type": "event", "kind": "gossip", "data": {}}', "unknown event kind 'gossip'"),
        (b'{"type": "result"}', "needs 'data'"),
        (b'{"type": "progress", "stage": "saving", "fraction": "half"}', "'fraction'"),
        (b'{"type": "error", "message": "m"}', "needs 'reason'"),
    ],
)
def test_a_malformed_line_is_a_clear_value_error(line: bytes, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        decode_line(line)


async def test_the_relay_drops_what_does_not_decode_and_keeps_the_order() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(Started(resumed_from_step=None, pid=7).encode().encode())
    reader.feed_data(b"garbage\n" + b'{"type": "telemetry"}\n' + b'{"type": "cancelled"}\n')
    reader.feed_data(Cancelled(step=2).encode().encode())
    reader.feed_eof()
    seen = [m async for m in read_messages(reader, structlog.get_logger())]
    assert seen == [Started(resumed_from_step=None, pid=7), Cancelled(step=2)]


def test_error_payload_is_built_from_and_back_into_a_finetune_error() -> None:
    training = Error.from_exception(NanLossError(step=3, learning_rate=1.0))
    assert (training.reason, training.step, training.kind) == ("NAN_LOSS", 3, "FAILED_PRECONDITION")
    plain = FinetuneError(ErrorKind.NOT_FOUND, "ADAPTER_NOT_FOUND", "gone", hint="train first", metadata={"a": "b"})
    error = Error.from_exception(plain)
    assert error == Error("ADAPTER_NOT_FOUND", "gone", "train first", step=0, kind="NOT_FOUND", metadata={"a": "b"})
    again = decode_line(error.encode())
    assert isinstance(again, Error)
    back = again.to_exception()
    assert (back.kind, back.reason, back.message, back.hint, back.metadata) == (
        ErrorKind.NOT_FOUND,
        "ADAPTER_NOT_FOUND",
        "gone",
        "train first",
        {"a": "b"},
    )
    assert Error("X", "m", kind="FROM_THE_FUTURE").to_exception().kind is ErrorKind.FAILED_PRECONDITION


def test_specs_ignore_unknown_keys_and_are_written_whole(tmp_path: Path) -> None:
    spec = WorkerSpec("job-1", {"lr": 1.0}, "m", "d.jsonl", str(tmp_path), cpus=[0, 1])
    assert WorkerSpec.from_dict({**spec.to_dict(), "from_a_newer_server": 1}) == spec
    path = spec.write(tmp_path / "sub" / "spec.json")
    assert WorkerSpec.read(path) == spec
    assert sorted(p.name for p in path.parent.iterdir()) == ["spec.json"]  # no temp file left behind
    with pytest.raises(TypeError):
        WorkerSpec.from_dict({"job_id": "job-1"})

    export = {"job_dir": "j", "config": {}, "model_ref": "m", "fmt": "merged", "target_dir": "t", "new": 1}
    assert ExportSpec.read(ExportSpec.from_dict(export).write(tmp_path / "e.json")).fmt == "merged"
    with pytest.raises(FinetuneError) as missing:
        ExportSpec.from_dict({"fmt": "merged"})
    assert missing.value.reason == "EXPORT_SPEC_INVALID"
    with pytest.raises(FinetuneError) as bad_format:
        ExportSpec.from_dict({**export, "fmt": "gguf"})
    assert bad_format.value.reason == "EXPORT_FORMAT"


class _ClosedPipe(io.StringIO):
    def write(self, _: str) -> int:
        raise BrokenPipeError


def test_a_broken_events_pipe_stops_the_worker_and_drops_the_rest() -> None:
    stop = threading.Event()
    good = io.StringIO()
    Channel(good, stop).send(Cancelled(step=1))
    assert good.getvalue() == '{"type":"cancelled","step":1}\n' and not stop.is_set()

    channel = Channel(_ClosedPipe(), stop)
    channel.send(Cancelled(step=1))
    assert channel.broken and stop.is_set()
    channel.send(Cancelled(step=2))  # dropped, not raised


def test_the_started_module_names_are_the_modules() -> None:
    assert train_worker.__name__ == train_worker.WORKER_MODULE
    assert export_worker.__name__ == export_worker.WORKER_MODULE
    assert generate_worker.__name__ == generate_worker.WORKER_MODULE


def test_a_refused_request_keeps_its_kind_reason_and_field_violations() -> None:
    error = field_error(ErrorKind.INVALID_ARGUMENT, "PROMPT_TOO_LONG", "messages", "too long", hint="shorter")
    message = decode_line(GenerateRefused.from_exception(error).encode())
    assert isinstance(message, GenerateRefused)
    again = message.to_exception()
    assert (again.kind, again.reason, again.hint) == (ErrorKind.INVALID_ARGUMENT, "PROMPT_TOO_LONG", "shorter")
    assert [(v.field, v.reason) for v in again.violations] == [("messages", "PROMPT_TOO_LONG")]
    with pytest.raises(ValueError, match="finish reason"):
        decode({"type": "done", "finish_reason": "tired", "prompt_tokens": 1, "completion_tokens": 1})


_STUCK_WORKER = """
import sys, threading, structlog
from finetune_server.workers.protocol import watch_stdin
stop = threading.Event()
threading.Thread(target=watch_stdin, args=(sys.stdin, stop, structlog.get_logger(), 0.2), daemon=True).start()
print("watching", flush=True)
threading.Event().wait()  # stuck: never checks `stop`, like a long step or a save
"""


def test_a_worker_whose_stdin_closed_exits_by_itself_even_when_stuck() -> None:
    worker = subprocess.Popen(
        [sys.executable, "-c", _STUCK_WORKER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert worker.stdin is not None and worker.stdout is not None
    assert worker.stdout.readline() == b"watching\n"
    worker.stdin.close()  # its server, or the Ray actor that started it, is gone
    assert worker.wait(timeout=30) == EXIT_CRASH
