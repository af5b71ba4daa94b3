"""A worker as a process on this host: spawn it with its message pipe, read that pipe, kill its process group.

Everything here is host-local (pipes, process groups, this host's cgroup); `supervisor.py` builds on it, and a
remote executor would replace it rather than reuse it. This module never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from finetune_server.host.cgroups import cgroup_files
from finetune_server.workers.protocol import Message, decode_line, module_command

log = structlog.get_logger(__name__)

LOG_TAIL_LINES = 40
MAX_MESSAGE_BYTES = 16 << 20  # one protocol line; metrics dicts are small, but never cut one
DRAIN_AFTER_EXIT_S = 5.0  # a grandchild that inherited the pipe must not keep us waiting for EOF


class WorkerProcess(Protocol):
    """What the supervisor uses of a worker's process: asyncio's Process, or one forked by a fork server."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def stdin(self) -> asyncio.StreamWriter | None: ...

    async def wait(self) -> int: ...


@dataclass
class MessagePipe:
    """A spawned worker (own process group, output to its log) and the pipe its JSON-line messages arrive on."""

    process: WorkerProcess
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
    reader, transport = await open_message_reader(read_fd)
    return MessagePipe(process, reader, transport)


async def open_message_reader(read_fd: int) -> tuple[asyncio.StreamReader, asyncio.ReadTransport]:
    """A stream over the read end of a worker's message pipe (taken over: closing the transport closes it)."""
    reader = asyncio.StreamReader(limit=MAX_MESSAGE_BYTES)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )
    return reader, transport


async def read_messages(reader: asyncio.StreamReader, bound: Any) -> AsyncIterator[Message]:
    """The messages a worker sends, in order, until EOF; malformed or oversized lines are dropped with a warning."""
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # a line over the limit: a protocol breach, treated as noise
            bound.warning("oversized worker message dropped")
            continue
        if not line:
            return
        try:
            message = decode_line(line)
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
