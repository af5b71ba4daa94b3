"""How worker processes start: fresh (`python -m`, ~10 s of imports) or forked from a warm fork server
(`forkserver.py`).

`WarmPool` keeps up to `size` fork servers, one per worker environment (the environment is the key: a worker forked
from one sees exactly what a fresh process started with it would see; a GPU slot's CUDA_VISIBLE_DEVICES is part of
it), least recently used closed first. A fork server that is still importing makes its first request wait for it;
one that is broken or dead is replaced, and a worker is started fresh meanwhile, so the pool never fails a start that
a fresh process would not. Both launchers return the same `MessagePipe`; `supervise` does not know which ran.
This module never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from finetune_server.workers.process import MessagePipe, open_message_reader, spawn_with_pipe
from finetune_server.workers.protocol import worker_args

log = structlog.get_logger(__name__)

FORKSERVER_MODULE = "finetune_server.workers.forkserver"
UNKNOWN_RETURNCODE = 255  # a worker whose fork server died before it: its exit status is lost
_PACKET = 1 << 16

EnvKey = tuple[tuple[str, str], ...]


class WorkerLauncher(Protocol):
    async def spawn(
        self, module: str, spec_path: Path, *, log_path: Path, env: Mapping[str, str], stdin: int
    ) -> MessagePipe:
        """Start worker `module` on `spec_path` in its own process group, output to `log_path`, with `env`.
        `stdin` is asyncio.subprocess.PIPE (commands) or DEVNULL."""
        ...

    def prewarm(self, env: Mapping[str, str]) -> None:
        """Get ready to start workers with `env` soon (no-op for fresh starts)."""
        ...

    async def close(self) -> None: ...


class FreshLauncher:
    """Every worker a fresh `python -m`: the behaviour with the pool off."""

    async def spawn(
        self, module: str, spec_path: Path, *, log_path: Path, env: Mapping[str, str], stdin: int
    ) -> MessagePipe:
        return await spawn_with_pipe(module, spec_path, log_path=log_path, env=env, stdin=stdin)

    def prewarm(self, env: Mapping[str, str]) -> None:
        pass

    async def close(self) -> None:
        pass


class ForkedProcess:
    """A worker forked by a fork server: the part of asyncio's Process that the supervisor uses."""

    def __init__(self, pid: int, stdin: asyncio.StreamWriter | None, exited: asyncio.Future[int]) -> None:
        self.pid = pid
        self.stdin = stdin
        self._exited = exited

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)


class ForkServer:
    """One fork server process and the socket it answers on."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self._env = dict(env)
        self._log_path = log_path
        self._sock: socket.socket | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._forked: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._early_exits: dict[int, int] = {}  # an exit reported before its fork's answer was read
        self._watchers: set[asyncio.Task[None]] = set()  # workers outliving this server, watched by pid
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # one fork request in flight: packets and their fds stay paired
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self.preload_s: float | None = None
        self._started = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            with self._log_path.open("ab") as log_file:
                self._process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    FORKSERVER_MODULE,
                    "--socket-fd",
                    str(theirs.fileno()),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,  # a Ctrl-C to the server's terminal must not kill it mid-fork
                    env=self._env,
                )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._reader = asyncio.create_task(self._read_replies())
        log.info("forkserver.started", pid=self._process.pid, log=str(self._log_path))

    @property
    def alive(self) -> bool:
        """Starting, importing or ready; False once it failed to start, broke, exited or was closed."""
        if self._closed or (self._started.done() and self._started.exception() is not None):
            return False
        return self._reader is None or not self._reader.done()

    async def fork(self, module: str, spec_path: Path, *, log_path: Path, stdin: int) -> MessagePipe:
        """A worker forked from this server. RuntimeError when this server cannot fork (broken or gone)."""
        return await self.fork_command(module, worker_args(spec_path, "{events_fd}"), log_path=log_path, stdin=stdin)

    async def fork_command(self, module: str, args: Sequence[str], *, log_path: Path, stdin: int) -> MessagePipe:
        """`module.main(args)` in a fork of this server, "{events_fd}" in `args` replaced by its pipe's fd."""
        try:
            await asyncio.shield(self._started)
        except OSError as exc:
            raise RuntimeError(f"the fork server did not start: {exc}") from exc
        await asyncio.shield(self._ready)
        read_fd, write_fd = os.pipe()
        stdin_read: int | None = None
        stdin_write: int | None = None
        if stdin == asyncio.subprocess.PIPE:
            stdin_read, stdin_write = os.pipe()
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fds = [write_fd, log_fd] + ([stdin_read] if stdin_read is not None else [])
        try:
            async with self._lock:
                request_id = next(self._ids)
                answer = asyncio.get_running_loop().create_future()
                self._forked[request_id] = answer
                request = {
                    "type": "fork",
                    "id": request_id,
                    "module": module,
                    "args": list(args),
                    "stdin": stdin_read is not None,
                }
                await self._send(json.dumps(request).encode(), fds)
                pid = await answer
        except BaseException:
            os.close(read_fd)
            if stdin_write is not None:
                os.close(stdin_write)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        exited = self._exit_of(pid)
        writer = await _stdin_writer(stdin_write) if stdin_write is not None else None
        reader, transport = await open_message_reader(read_fd)
        return MessagePipe(ForkedProcess(pid, writer, exited), reader, transport)

    def _exit_of(self, pid: int) -> asyncio.Future[int]:
        """The future of worker `pid`'s exit code: reported by this server, or watched by pid once it is gone."""
        exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if pid in self._early_exits:
            exited.set_result(self._early_exits.pop(pid))
        elif self._reader is not None and self._reader.done():  # it died between forking and this: nobody reports
            self._watch_gone(pid, exited)
        else:
            self._exits[pid] = exited
        return exited

    def _watch_gone(self, pid: int, exited: asyncio.Future[int]) -> None:
        log.warning("forkserver.gone_with_worker_running", worker_pid=pid)
        task = asyncio.get_running_loop().create_task(_settle_when_gone(pid, exited))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _send(self, data: bytes, fds: list[int]) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                socket.send_fds(self._sock, [data], fds)
                return
            except BlockingIOError:  # its queue is full while it imports: wait until it reads
                writable = loop.create_future()
                loop.add_writer(self._sock, writable.set_result, None)
                try:
                    await writable
                finally:
                    loop.remove_writer(self._sock)

    async def _read_replies(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        bound = log.bind(forkserver=self._process.pid if self._process else None)
        try:
            while data := await loop.sock_recv(self._sock, _PACKET):
                self._on_reply(json.loads(data), bound)
        except (OSError, ValueError) as exc:
            bound.warning("forkserver.lost", error=str(exc))
        finally:
            self._fail_pending()

    def _on_reply(self, reply: dict[str, Any], bound: Any) -> None:
        kind = reply.get("type")
        if kind == "ready":
            self.preload_s = reply.get("preload_s")
            bound.info("forkserver.ready", preload_s=self.preload_s)
            self._ready.set_result(None)
        elif kind == "broken":
            bound.warning("forkserver.broken", error=reply.get("error"))
            self._ready.set_exception(RuntimeError(f"the fork server cannot fork: {reply.get('error')}"))
        elif kind == "forked":
            answer = self._forked.pop(int(reply["id"]), None)
            if answer is not None and not answer.done():
                answer.set_result(int(reply["pid"]))
        elif kind == "exited":
            pid, code = int(reply["pid"]), int(reply["returncode"])
            exited = self._exits.pop(pid, None)
            if exited is None:
                self._early_exits[pid] = code
            elif not exited.done():
                exited.set_result(code)

    def _fail_pending(self) -> None:
        """The fork server is gone: requests fail (the pool starts those workers fresh); running workers are
        watched by pid until they end, their exit status unknown."""
        gone = RuntimeError("the fork server exited")
        if not self._ready.done():
            self._ready.set_exception(gone)
        for answer in self._forked.values():
            if not answer.done():
                answer.set_exception(gone)
        self._forked.clear()
        for pid, exited in self._exits.items():
            if not exited.done():
                self._watch_gone(pid, exited)
        self._exits.clear()

    async def close(self) -> None:
        """Stop the fork server (its socket's EOF); workers it forked are not touched."""
        self._closed = True
        with contextlib.suppress(Exception):
            await self._started
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._sock is not None:
            self._sock.close()
        if self._process is not None and self._process.returncode is None:
            try:
                await asyncio.wait_for(self._process.wait(), 5)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        if not self._ready.done():
            self._ready.cancel()
        elif not self._ready.cancelled():
            self._ready.exception()  # retrieved: a broken server's error was logged already


async def _settle_when_gone(pid: int, exited: asyncio.Future[int]) -> None:
    """Resolve `exited` once process `pid` (not our child: the fork server's) has ended."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        exited.set_result(UNKNOWN_RETURNCODE)
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_exit() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    if not exited.done():
        exited.set_result(UNKNOWN_RETURNCODE)


async def _stdin_writer(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(fd, "wb", buffering=0)
    )
    return asyncio.StreamWriter(transport, protocol, None, loop)


class WarmPool:
    """Workers forked from warm fork servers, one per environment, at most `size` of them."""

    def __init__(self, size: int, log_dir: Path) -> None:
        if size < 1:
            raise ValueError("a warm pool holds at least one fork server; use FreshLauncher for none")
        self.size = size
        self._log_dir = log_dir
        self._servers: OrderedDict[EnvKey, ForkServer] = OrderedDict()
        self._numbers = itertools.count(1)
        self._fresh = FreshLauncher()
        self._closing: set[asyncio.Task[None]] = set()
        self.forked = 0  # workers started from the pool, and fresh ones (a fork server not usable)
        self.fresh = 0

    async def spawn(
        self, module: str, spec_path: Path, *, log_path: Path, env: Mapping[str, str], stdin: int
    ) -> MessagePipe:
        for _ in range(2):  # a server found dead is replaced once; a replacement that cannot fork either: fresh
            server = self._server_for(env)
            try:
                pipe = await server.fork(module, spec_path, log_path=log_path, stdin=stdin)
            except RuntimeError as exc:
                log.warning("forkserver.unusable", error=str(exc), module=module)
                self._drop(server)
                continue
            self.forked += 1
            return pipe
        self.fresh += 1
        return await self._fresh.spawn(module, spec_path, log_path=log_path, env=env, stdin=stdin)

    def prewarm(self, env: Mapping[str, str]) -> None:
        self._server_for(env)

    def _server_for(self, env: Mapping[str, str]) -> ForkServer:
        """The live fork server for `env`, started now if there is none (callers wait in `fork`)."""
        key: EnvKey = tuple(sorted(env.items()))
        server = self._servers.get(key)
        if server is not None and server.alive:
            self._servers.move_to_end(key)
            return server
        if server is not None:
            self._drop(server)
        server = ForkServer(env, self._log_dir / f"forkserver-{next(self._numbers)}.log")
        self._servers[key] = server
        while len(self._servers) > self.size:
            _, oldest = self._servers.popitem(last=False)
            self._close_later(oldest)
        return server

    def _drop(self, server: ForkServer) -> None:
        for key, held in list(self._servers.items()):
            if held is server:
                del self._servers[key]
        self._close_later(server)

    def _close_later(self, server: ForkServer) -> None:
        task = asyncio.get_running_loop().create_task(server.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        servers = list(self._servers.values())
        self._servers.clear()
        await asyncio.gather(*(server.close() for server in servers), *self._closing)


def open_launcher(size: int, log_dir: Path) -> WorkerLauncher:
    """The pool the settings ask for: `size` fork servers, or fresh processes when 0."""
    return WarmPool(size, log_dir) if size > 0 else FreshLauncher()
