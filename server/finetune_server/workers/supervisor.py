"""The server half of a worker: spawn it, relay its messages in order, cancel it, and tell how it ended.

The worker (see `worker.py` for the protocol) runs in its own process group with an inherited pipe for its messages
and stdin for commands. Its death is noticed at once (EOF of the pipe, then wait()), whatever the cause: a final
message, a typed error, a traceback, SIGKILL from the kernel's OOM killer or from us. This module never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from finetune_server.host.cgroups import cgroup_files
from finetune_server.storage.layout import JobDir
from finetune_server.workers.train import WORKER_MODULE, WorkerSpec

log = structlog.get_logger(__name__)

FINAL_TYPES = frozenset({"result", "cancelled", "error"})
LOG_TAIL_LINES = 40
MAX_MESSAGE_BYTES = 16 << 20  # one protocol line; metrics dicts are small, but never cut one
DRAIN_AFTER_EXIT_S = 5.0  # a grandchild that inherited the pipe must not keep us waiting for EOF
_OOM_WORDS = re.compile(r"\bKilled\b|(?i:out of memory|oom[-_ ]kill)")  # "Killed": as a shell prints it

OnMessage = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class WorkerExit:
    """How a worker ended. `final` is its result/cancelled/error message, None when it crashed or was killed."""

    pid: int
    returncode: int  # as asyncio reports it: negative when killed by a signal
    signal: signal.Signals | None
    final: dict[str, Any] | None
    log_tail: list[str] = field(default_factory=list)
    oom_killed: bool = False
    started: dict[str, Any] | None = None  # the "started" message, if the worker got that far

    @property
    def crashed(self) -> bool:
        """No final message: a traceback (exit 2), a signal, or a protocol breach. The server fails or retries."""
        return self.final is None


def module_command(module: str, spec_path: Path, events_fd: int) -> list[str]:
    """How every worker module is started: its spec file and the inherited fd its messages go to."""
    return [sys.executable, "-m", module, "--spec", str(spec_path), "--events-fd", str(events_fd)]


def worker_command(spec_path: Path, events_fd: int) -> list[str]:
    return module_command(WORKER_MODULE, spec_path, events_fd)


def spec_path_for(spec: WorkerSpec) -> Path:
    return JobDir(Path(spec.output_dir)).worker_spec


def worker_env(spec: WorkerSpec, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: `env` (default: ours), its GPU slot as CUDA_VISIBLE_DEVICES, unbuffered output."""
    out = dict(os.environ if env is None else env)
    if spec.gpu_slot is not None:
        out["CUDA_VISIBLE_DEVICES"] = str(spec.gpu_slot)
    out["PYTHONUNBUFFERED"] = "1"  # a traceback reaches the log file even when the worker dies right after
    return out


def kill_process_group(pgid: int, sig: signal.Signals = signal.SIGKILL) -> bool:
    """Signal a worker's process group (pgid == the worker's pid). True if it existed; harmless when it is gone.

    For crash recovery: a worker recorded before a server crash may still be running (it stops by itself on stdin
    EOF, but may be stuck in a long forward pass or a save).
    """
    if pgid <= 1:
        raise ValueError(f"refusing to signal process group {pgid}")
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # not ours (the pid was reused by another user's process)
        log.warning("not allowed to signal process group", pgid=pgid)
        return False
    return True


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 64 << 10) -> list[str]:
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


def cgroup_oom_kills() -> int | None:
    """The kernel's OOM-kill counter of our memory cgroup (v2 memory.events, v1 memory.oom_control), if readable."""
    for candidate in cgroup_files("memory.events", "memory", "memory.oom_control"):
        with contextlib.suppress(OSError, ValueError):
            for line in candidate.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return None


@dataclass
class MessagePipe:
    """A spawned worker (own process group, output to its log) and the pipe its JSON-line messages arrive on."""

    process: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    transport: asyncio.ReadTransport

    @property
    def pid(self) -> int:
        return self.process.pid


async def spawn_with_pipe(
    module: str, spec_path: Path, *, log_path: Path, env: Mapping[str, str], stdin: int
) -> MessagePipe:
    """Start `python -m module --spec SPEC --events-fd N`; the child holds the only write end, so its death is EOF."""
    read_fd, write_fd = os.pipe()
    command = module_command(module, spec_path, write_fd)
    try:
        with log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=stdin,
                stdout=log_file,
                stderr=log_file,
                pass_fds=(write_fd,),
                start_new_session=True,
                env=dict(env),
            )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    reader = asyncio.StreamReader(limit=MAX_MESSAGE_BYTES)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )
    return MessagePipe(process, reader, transport)


async def read_messages(reader: asyncio.StreamReader, bound: Any) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects a worker sends, in order, until EOF; malformed or oversized lines are dropped with a warning."""
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # a line over the limit: a protocol breach, treated as noise
            bound.warning("oversized worker message dropped")
            continue
        if not line:
            return
        try:
            message = _parse(line)
        except ValueError as exc:
            bound.warning("bad worker message", error=str(exc), line=line[:200].decode(errors="replace"))
            continue
        yield message


async def wait_for_exit(pipe: MessagePipe, relay_task: asyncio.Task[None], bound: Any) -> int:
    """The worker's exit code, once every message it sent has been relayed."""
    returncode = await pipe.process.wait()
    # The pipe normally hits EOF with the exit; only a grandchild holding it could delay that.
    done, _ = await asyncio.wait({relay_task}, timeout=DRAIN_AFTER_EXIT_S)
    if not done:
        bound.warning("events pipe still open after the worker exited: closing it")
        pipe.transport.close()
    await relay_task
    return returncode


async def run_worker(
    spec: WorkerSpec,
    *,
    on_message: OnMessage,
    cancel: asyncio.Event,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cancel_grace_s: float = 15,
    term_grace_s: float = 5,
) -> WorkerExit:
    """Run one worker attempt to its end, awaiting `on_message` for each protocol message in order.

    When `cancel` is set: "cancel" on stdin; still running after `cancel_grace_s`: SIGTERM to the group; after
    `term_grace_s` more: SIGKILL. If this coroutine is itself cancelled, the worker's stdin is closed (it stops at
    its next micro-step, as if the server had died) and the group is killed after the same graces, in the background.
    """
    bound = log.bind(job_id=spec.job_id)
    spec_path = spec.write(spec_path_for(spec))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    oom_before = cgroup_oom_kills()
    pipe = await spawn_with_pipe(
        WORKER_MODULE, spec_path, log_path=log_path, env=worker_env(spec, env), stdin=asyncio.subprocess.PIPE
    )
    process, pid = pipe.process, pipe.pid
    bound.info("worker spawned", pid=pid, gpu_slot=spec.gpu_slot, log=str(log_path))
    messages: dict[str, dict[str, Any] | None] = {"started": None, "final": None}

    async def relay() -> None:
        async for message in read_messages(pipe.reader, bound):
            kind = message.get("type")
            if kind == "started":
                messages["started"] = message
            elif kind in FINAL_TYPES:
                if messages["final"] is not None:
                    bound.warning("second final message ignored", type=kind)
                    continue
                messages["final"] = message
            await on_message(message)

    async def stop_on_cancel() -> None:
        await cancel.wait()
        bound.info("cancelling worker", pid=pid)
        await _send_cancel(process)
        await _escalate(process, pid, cancel_grace_s, term_grace_s, bound)

    relay_task = asyncio.create_task(relay())
    cancel_task = asyncio.create_task(stop_on_cancel())
    try:
        returncode = await wait_for_exit(pipe, relay_task, bound)
    except BaseException:
        relay_task.cancel()
        if process.returncode is None:
            _abandon(process, pid, cancel_grace_s, term_grace_s, bound)
        raise
    finally:
        cancel_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cancel_task
        pipe.transport.close()
        if process.stdin is not None:
            process.stdin.close()
    kill_process_group(pid)  # leftovers the worker started must not hold the GPU after it
    return _exit_report(pid, returncode, messages, log_path, oom_before, bound)


def _parse(line: bytes) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


async def _send_cancel(process: asyncio.subprocess.Process) -> None:
    if process.stdin is None:
        return
    try:
        process.stdin.write(b"cancel\n")
        await process.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):  # it is exiting already
        pass


async def _escalate(process: asyncio.subprocess.Process, pid: int, grace_s: float, term_s: float, bound: Any) -> None:
    """Wait `grace_s` for a clean exit, then SIGTERM the group, then SIGKILL it."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, term_s)):
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), wait_s)
            return
        except TimeoutError:
            bound.warning("worker did not stop in time", pid=pid, signal=sig.name, waited_s=wait_s)
            kill_process_group(pid, sig)


_background: set[asyncio.Task[None]] = set()


def _abandon(process: asyncio.subprocess.Process, pid: int, grace_s: float, term_s: float, bound: Any) -> None:
    """Our caller went away mid-run: close stdin so the worker stops itself, and make sure it does."""
    if process.stdin is not None:
        process.stdin.close()
    task = asyncio.get_running_loop().create_task(_escalate(process, pid, grace_s, term_s, bound))
    _background.add(task)
    task.add_done_callback(_background.discard)


def _exit_report(
    pid: int,
    returncode: int,
    messages: dict[str, dict[str, Any] | None],
    log_path: Path,
    oom_before: int | None,
    bound: Any,
) -> WorkerExit:
    sig = None
    if returncode < 0:
        with contextlib.suppress(ValueError):
            sig = signal.Signals(-returncode)
    final = messages["final"]
    tail = read_log_tail(log_path)
    oom = False
    if sig == signal.SIGKILL and final is None:
        oom_after = cgroup_oom_kills()
        counter_rose = oom_before is not None and oom_after is not None and oom_after > oom_before
        oom = counter_rose or any(_OOM_WORDS.search(line) for line in tail)
    bound.info(
        "worker exited",
        pid=pid,
        returncode=returncode,
        signal=sig.name if sig else None,
        final=final.get("type") if final else None,
        oom_killed=oom,
    )
    return WorkerExit(
        pid=pid,
        returncode=returncode,
        signal=sig,
        final=final,
        log_tail=tail,
        oom_killed=oom,
        started=messages["started"],
    )
