"""Encoding batches in several processes, in order, with few batches in flight.

Why not multiprocessing or concurrent.futures: their "spawn" and "forkserver" children re-import the caller's
`__main__`, which re-runs a script that calls run_training without an `if __name__ == "__main__"` guard, and "fork"
copies a process that holds torch's (and gloo's) threads and locks. So each encoding process is a fresh
``python -m finetune_server.training.data.encoding_processes``: it reads the pickled EncoderSettings, then
(row, Example) batches, from stdin and writes a pickled BatchResult per batch to its own copy of stdout (stdout
itself goes to stderr, so a library that prints cannot corrupt the stream). One writer thread per process feeds its
stdin, so a batch being written never waits on a result being read. Results come back in submission order: batch k
goes to process k mod N, and each process answers in order.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import subprocess
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from finetune_server.training.data.batch_encode import BatchResult, EncoderSettings, encode_batch
from finetune_server.training.data.formats import Example
from finetune_server.training.data.token_cache import CacheStopped

MODULE = "finetune_server.training.data.encoding_processes"
IN_FLIGHT_PER_PROCESS = 2  # enough to keep each process busy, few enough to keep memory flat

Batch = list[tuple[int, Example]]


class _EncodingProcess:
    """One child and the thread that writes its input."""

    def __init__(self, settings: EncoderSettings) -> None:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(sys.path)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", MODULE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._inbox.put(settings)
        self._writer = threading.Thread(target=self._write, name="encoding-process-input", daemon=True)
        self._writer.start()

    def _write(self) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            while (item := self._inbox.get()) is not None:
                pickle.dump(item, stdin, protocol=pickle.HIGHEST_PROTOCOL)
                stdin.flush()
        except OSError:  # the child died; reading its result says how
            pass
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def submit(self, batch: Batch) -> None:
        self._inbox.put(batch)

    def result(self) -> BatchResult:
        assert self.process.stdout is not None
        try:
            status, value = pickle.load(self.process.stdout)
        except (EOFError, pickle.UnpicklingError, OSError):
            code = self.process.wait()
            raise RuntimeError(f"an encoding process ended unexpectedly (exit code {code})") from None
        if status != "ok":
            raise RuntimeError(f"an encoding process failed:\n{value}")
        return value

    def close(self, *, kill: bool) -> None:
        """End the child: at once (`kill`), else by closing its input and letting it exit."""
        self._inbox.put(None)
        if kill:
            self.process.kill()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._writer.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def encode_in_processes(
    batches: Iterable[Batch], settings: EncoderSettings, processes: int, should_stop: Callable[[], bool]
) -> Iterator[BatchResult]:
    """`encode_batch` of every batch, in order, spread over `processes` children; CacheStopped on a stop."""
    pool = [_EncodingProcess(settings) for _ in range(processes)]
    in_flight: deque[_EncodingProcess] = deque()
    finished = False
    try:
        for k, batch in enumerate(batches):
            worker = pool[k % processes]
            worker.submit(batch)
            in_flight.append(worker)
            if len(in_flight) >= processes * IN_FLIGHT_PER_PROCESS:
                if should_stop():
                    raise CacheStopped
                yield in_flight.popleft().result()
        while in_flight:
            if should_stop():
                raise CacheStopped
            yield in_flight.popleft().result()
        finished = True
    finally:
        for worker in pool:
            worker.close(kill=not finished)


def main() -> int:
    """The child: settings, then batches until EOF; one ("ok", BatchResult) or ("error", traceback) per batch."""
    out: IO[bytes] = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever prints goes to stderr, never into the result stream
    stdin = sys.stdin.buffer
    try:
        settings: EncoderSettings = pickle.load(stdin)
    except EOFError:
        return 0
    while True:
        try:
            batch = pickle.load(stdin)
        except EOFError:
            return 0
        try:
            reply: tuple[str, Any] = ("ok", encode_batch(batch, settings))
        except Exception:
            reply = ("error", traceback.format_exc())
        pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()
        if reply[0] != "ok":
            return 1


if __name__ == "__main__":
    sys.exit(main())
