"""A fork server: a process that has imported torch, transformers and peft once, and forks a fresh worker per request.

Importing the heavy libraries is most of a worker's start (about 10 s of CPU on a small machine). The server keeps
one of these per worker environment (`warm_pool.py`); each worker is still its own process, forked from this one's
pristine state, so crash isolation, cancel, memory returned at exit and one job never seeing another's state are as
with a fresh `python -m`. This process never runs a computation: no CUDA context and no OpenMP team exist when it
forks (the preload runs with one thread, and it refuses to fork if CUDA got initialised).

Started as ``python -m finetune_server.workers.forkserver --socket-fd N`` with the workers' environment. It talks to
the server over a SOCK_SEQPACKET socket, one JSON object per packet:

- it sends ``{"type": "ready", "preload_s": float}`` once the imports are done (``{"type": "broken", "error": str}``
  when it cannot fork safely; it then exits);
- the server sends ``{"type": "fork", "id": int, "module": str, "args": [str], "stdin": bool}`` with the worker's
  fds as SCM_RIGHTS: the events pipe's write end, its log file, and its stdin's read end when `stdin`;
- it answers ``{"type": "forked", "id": int, "pid": int}``, and later ``{"type": "exited", "pid": int,
  "returncode": int}`` (negative: killed by that signal, as asyncio reports it).
The socket's EOF (the server closed it, or died) ends it; workers already forked live on by the protocol's rules.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from finetune_server.workers.protocol import exit_process

PRELOAD_MODULES = (
    "torch",
    "transformers",
    "peft",
    "finetune_server.training.engine.recipe",
    "finetune_server.export.package",
    "finetune_server.workers.train",
    "finetune_server.workers.export",
    "finetune_server.workers.generate",
)
MAX_PACKET = 1 << 16
FDS_PER_FORK = 3
EXIT_UNCAUGHT = 1  # what `python -m` exits with on an uncaught exception
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def preload() -> None:
    """Import what workers import, single-threaded and without touching CUDA, then restore the environment."""
    saved = {name: os.environ.get(name) for name in (*_THREAD_VARIABLES, "PYTORCH_NVML_BASED_CUDA_CHECK")}
    os.environ.update(dict.fromkeys(_THREAD_VARIABLES, "1"))  # no OpenMP team to inherit half-alive
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # a library's is_available() then leaves CUDA alone
    try:
        for module in PRELOAD_MODULES:
            try:
                importlib.import_module(module)
            except Exception as exc:  # the worker that needs it fails as a fresh process would
                sys.stderr.write(f"forkserver: preloading {module} failed: {exc!r}\n")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def fork_problem() -> str | None:
    """Why forking now would hand workers a broken state, or None."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised while preloading"
    return None


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(json.dumps(message).encode())


def _threads_as_fresh() -> int | None:
    """The thread count a fresh process would have taken from its environment (the preload forced 1)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _run_worker(sock: socket.socket, wakeup: int, request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become a worker as `python -m module args` would be, and never return."""
    code = EXIT_UNCAUGHT
    try:
        sock.close()
        os.close(wakeup)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        os.setsid()  # its own process group, as the server kills groups
        events_fd, log_fd, *stdin_fd = fds
        stdin = stdin_fd[0] if stdin_fd else os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        for fd in {stdin, log_fd} - {0, 1, 2}:
            os.close(fd)
        os.set_inheritable(events_fd, True)
        torch = sys.modules.get("torch")
        threads = _threads_as_fresh()
        if torch is not None and threads:
            torch.set_num_threads(threads)
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()  # a fresh process seeds from the OS; a fork would share the parent's state
        args = [arg.replace("{events_fd}", str(events_fd)) for arg in request["args"]]
        module = request["module"]
        sys.argv = [module, *args]
        result = importlib.import_module(module).main(args)
        code = int(result or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_UNCAUGHT)
    except BaseException:
        traceback.print_exc()
    finally:
        exit_process(code)


def _returncode(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"type": "exited", "pid": pid, "returncode": _returncode(status)})


def serve(sock: socket.socket) -> None:
    """Fork a worker per request until the socket closes; report each worker's exit."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wake-up fd tells select; reaping happens below
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_read], [], [], 5.0)
        if wake_read in ready:
            os.read(wake_read, 4096)
        _reap(sock)  # every round: a lost wake-up byte only delays a report
        if sock.fileno() not in ready:
            continue
        data, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, FDS_PER_FORK)
        if not data:
            return
        request = json.loads(data)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(wake_write)
            _run_worker(sock, wake_read, request, fds)
        for fd in fds:  # the worker holds the only copies: its death is the pipe's EOF
            os.close(fd)
        _send(sock, {"type": "forked", "id": request["id"], "pid": pid})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune_server.workers.forkserver", description=__doc__)
    parser.add_argument("--socket-fd", required=True, type=int)
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.socket_fd)
    started = time.monotonic()
    preload()
    problem = fork_problem()
    if problem is not None:
        _send(sock, {"type": "broken", "error": problem})
        return 0
    _send(sock, {"type": "ready", "preload_s": round(time.monotonic() - started, 3)})
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server is gone
        serve(sock)
    return 0


if __name__ == "__main__":
    exit_process(main())
