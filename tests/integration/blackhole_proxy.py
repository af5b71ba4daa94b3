"""A TCP proxy on 127.0.0.1 that can make a connection die silently, as a load balancer or NAT that forgot it does.

It forwards bytes both ways and reads the HTTP/2 frames going past (plaintext gRPC), counting PINGs, their ACKs,
GOAWAYs and HEADERS per direction, so a test can wait for "the client pinged 5 times" instead of sleeping. Once armed,
a connection idle for `idle_s` (no byte either way) is blackholed: from then on whatever arrives is read and dropped,
and neither side gets a FIN or an RST; only keepalive can tell the connection is gone. At most `max_drops`
connections are blackholed, so the one a client reconnects on carries on.

The proxy runs its own asyncio loop in a thread; its counters change under `condition`, which `wait_for` waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
HEADERS, PING, GOAWAY = 0x1, 0x6, 0x7
ACK = 0x1


@dataclass
class FrameCounts:
    """The HTTP/2 frames one direction of a connection carried (the client's side starts with the preface)."""

    expect_preface: bool
    pings: int = 0
    ping_acks: int = 0
    goaways: int = 0
    headers: int = 0
    _pending: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> None:
        self._pending += data
        if self.expect_preface:
            if len(self._pending) < len(PREFACE):
                return
            assert self._pending.startswith(PREFACE), "not plaintext HTTP/2"
            del self._pending[: len(PREFACE)]
            self.expect_preface = False
        while len(self._pending) >= FRAME_HEADER:
            length = int.from_bytes(self._pending[:3], "big")
            if len(self._pending) < FRAME_HEADER + length:
                return
            kind, flags = self._pending[3], self._pending[4]
            del self._pending[: FRAME_HEADER + length]
            if kind == PING:
                if flags & ACK:
                    self.ping_acks += 1
                else:
                    self.pings += 1
            elif kind == GOAWAY:
                self.goaways += 1
            elif kind == HEADERS:
                self.headers += 1


@dataclass
class ProxiedConnection:
    """One client connection: what went up (client to server) and down, and whether it was blackholed."""

    up: FrameCounts = field(default_factory=lambda: FrameCounts(expect_preface=True))
    down: FrameCounts = field(default_factory=lambda: FrameCounts(expect_preface=False))
    last_activity: float = field(default_factory=time.monotonic)
    blackholed: bool = False
    idle_timer: asyncio.TimerHandle | None = None


class BlackholeProxy:
    def __init__(self, target: str, *, idle_s: float, max_drops: int = 1) -> None:
        self._target_host, port = target.rsplit(":", 1)
        self._target_port = int(port)
        self.idle_s = idle_s
        self.max_drops = max_drops
        self.condition = threading.Condition()
        self.connections: list[ProxiedConnection] = []
        self.armed = False
        self.drops = 0
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="blackhole-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    def __enter__(self) -> Self:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def arm(self) -> None:
        """From now on, blackhole connections idle for `idle_s` (counted from their last byte)."""
        with self.condition:
            self.armed = True
        self._loop.call_soon_threadsafe(self._reschedule_all)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self.condition:
            seen = self.condition.wait_for(predicate, timeout)
            assert seen, f"timed out after {timeout} s waiting for {what}; drops={self.drops}, {self.connections}"

    # -- the loop's side -------------------------------------------------------------------------------------------

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(self._target_host, self._target_port)
        self._writers += [client_writer, server_writer]
        connection = ProxiedConnection()
        with self.condition:
            self.connections.append(connection)
            self.condition.notify_all()
        self._reschedule(connection)
        await asyncio.gather(
            self._pump(client_reader, server_writer, connection, connection.up),
            self._pump(server_reader, client_writer, connection, connection.down),
        )

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        connection: ProxiedConnection,
        counts: FrameCounts,
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                with self.condition:
                    if connection.blackholed:
                        continue  # read and dropped: the other side hears nothing, not even a close
                    counts.feed(data)
                    connection.last_activity = time.monotonic()
                    self.condition.notify_all()
                self._reschedule(connection)
                sink.write(data)
                await sink.drain()
            if not connection.blackholed:
                sink.close()  # an orderly close travels on, as through any proxy

    def _reschedule_all(self) -> None:
        for connection in self.connections:
            self._reschedule(connection)

    def _reschedule(self, connection: ProxiedConnection) -> None:
        if connection.idle_timer is not None:
            connection.idle_timer.cancel()
        due = connection.last_activity + self.idle_s - time.monotonic()
        connection.idle_timer = self._loop.call_later(max(due, 0.0), self._on_idle, connection)

    def _on_idle(self, connection: ProxiedConnection) -> None:
        with self.condition:
            if self.armed and not connection.blackholed and self.drops < self.max_drops:
                connection.blackholed = True
                self.drops += 1
                self.condition.notify_all()
