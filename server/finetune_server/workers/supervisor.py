"""The server half of a worker: spawn it, relay its messages in order, stop it, and tell how it ended.

`supervise` runs any worker module of the protocol (`protocol.py`); `run_worker` (a training attempt), `run_export`
(one export) and `run_generate` (a generation worker, many requests) are its uses. A worker's death is noticed at
once (EOF of the pipe, then wait()), whatever the cause: a final message, a typed error, a traceback, SIGKILL from
the kernel's OOM killer or from us. This module never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.export.package import remove_staging
from finetune_server.host.devices import count_gpus, detect_devices
from finetune_server.storage import layout
from finetune_server.storage.layout import JobDir
from finetune_server.workers import export as export_worker
from finetune_server.workers import generate as generate_worker
from finetune_server.workers import train as train_worker
from finetune_server.workers.export import ExportSpec
from finetune_server.workers.generate import GenerateSpec
from finetune_server.workers.gpu_slots import CUDA_VISIBLE_DEVICES
from finetune_server.workers.process import (
    MessagePipe,
    WorkerProcess,
    cgroup_oom_kills,
    kill_process_group,
    read_log_tail,
    read_messages,
    wait_for_exit,
)
from finetune_server.workers.protocol import (
    FINAL_MESSAGES,
    Artifact,
    Error,
    ExportProgress,
    FinalMessage,
    Message,
    Started,
)
from finetune_server.workers.train import WorkerSpec
from finetune_server.workers.warm_pool import FreshLauncher, WorkerLauncher

log = structlog.get_logger(__name__)

CRASH_TAIL_LINES = 20  # of an export's log, in its EXPORT_CRASHED message
_OOM_WORDS = re.compile(r"\bKilled\b|(?i:out of memory|oom[-_ ]kill)")  # "Killed": as a shell prints it

OnMessage = Callable[[Message], Awaitable[None]]
OnProgress = Callable[[ExportProgress], Awaitable[None]]


@dataclass(frozen=True)
class WorkerExit:
    """How a worker ended. `final` is its final message (result, cancelled, error, artifact), None when it crashed."""

    pid: int
    returncode: int  # as asyncio reports it: negative when killed by a signal
    signal: signal.Signals | None
    final: FinalMessage | None
    log_tail: list[str] = field(default_factory=list)
    oom_killed: bool = False
    started: Started | None = None  # the "started" message, if the worker got that far
    cause: str = ""  # how it ended when no exit status tells (a cluster executor lost it with its actor)

    @property
    def how(self) -> str:
        """How it ended, for a message: its cause, else the signal that killed it, else its exit code."""
        if self.cause:
            return self.cause
        return f"signal {self.signal.name}" if self.signal else f"exit code {self.returncode}"

    @property
    def crashed(self) -> bool:
        """No final message: a traceback (exit 2), a signal, or a protocol breach. The server fails or retries."""
        return self.final is None


@dataclass
class _Seen:
    """What a relay has seen of a worker so far."""

    started: Started | None = None
    final: FinalMessage | None = None


# --- any worker ------------------------------------------------------------------------------------------------------


async def supervise(
    module: str,
    spec_path: Path,
    *,
    on_message: OnMessage,
    log_path: Path,
    env: Mapping[str, str],
    bound: Any,
    cancel: asyncio.Event | None = None,
    cancel_grace_s: float = 15,
    term_grace_s: float = 5,
    commands: asyncio.Queue[bytes | None] | None = None,
    launcher: WorkerLauncher | None = None,
) -> WorkerExit:
    """Run worker `module` on `spec_path` to its end, awaiting `on_message` for each message in order. `launcher`
    starts it (default: a fresh `python -m`; `warm_pool.WarmPool` forks it from a warm fork server).

    With `commands` (and no `cancel`), the worker's stdin gets each line put in the queue, in order; None closes it.

    With `cancel`, the worker takes commands on stdin. When `cancel` is set: "cancel" on stdin; still running after
    `cancel_grace_s`: SIGTERM to the group; after `term_grace_s` more: SIGKILL. If this coroutine is itself
    cancelled, the worker's stdin is closed (it stops at its next micro-step, as if the server had died) and the
    group is killed after the same graces, in the background.
    Without `cancel`, the worker has no stdin; if this coroutine is cancelled, the group is killed at once and reaped
    before the cancellation goes on, so the caller may clean up what the worker was writing.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    oom_before = cgroup_oom_kills()
    if cancel is not None and commands is not None:
        raise ValueError("a worker takes either cancel or commands on its stdin")
    stdin = asyncio.subprocess.DEVNULL if cancel is None and commands is None else asyncio.subprocess.PIPE
    pipe = await (launcher or FreshLauncher()).spawn(module, spec_path, log_path=log_path, env=env, stdin=stdin)
    process, pid = pipe.process, pipe.pid
    bound.info("worker spawned", module=module, pid=pid, log=str(log_path))
    seen = _Seen()
    relay_task = asyncio.create_task(_relay(pipe, on_message, seen, bound))
    cancel_task: asyncio.Task[None] | None = None
    if cancel is not None:
        cancel_task = asyncio.create_task(_stop_on_cancel(cancel, process, cancel_grace_s, term_grace_s, bound))
    elif commands is not None:
        cancel_task = asyncio.create_task(_write_commands(commands, process))
    try:
        returncode = await wait_for_exit(pipe, relay_task, bound)
    except BaseException:
        relay_task.cancel()
        if cancel is None:
            await _kill_and_reap(pipe)
        elif process.returncode is None:
            _abandon(process, cancel_grace_s, term_grace_s, bound)
        raise
    finally:
        if cancel_task is not None:
            cancel_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cancel_task
        pipe.transport.close()
        if process.stdin is not None:
            process.stdin.close()
    kill_process_group(pid)  # leftovers the worker started must not hold the GPU after it
    return _exit_report(pid, returncode, seen, log_path, oom_before, bound)


async def _relay(pipe: MessagePipe, on_message: OnMessage, seen: _Seen, bound: Any) -> None:
    async for message in read_messages(pipe.reader, bound):
        if isinstance(message, Started):
            seen.started = message
        elif isinstance(message, FINAL_MESSAGES):
            if seen.final is not None:
                bound.warning("second final message ignored", type=message.TYPE)
                continue
            seen.final = message
        await on_message(message)


async def _write_commands(commands: asyncio.Queue[bytes | None], process: WorkerProcess) -> None:
    assert process.stdin is not None
    while (line := await commands.get()) is not None:
        try:
            process.stdin.write(line)
            await process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):  # it died: supervise notices by the pipe's EOF
            return
    process.stdin.close()


async def _stop_on_cancel(
    cancel: asyncio.Event, process: WorkerProcess, grace_s: float, term_s: float, bound: Any
) -> None:
    await cancel.wait()
    bound.info("cancelling worker", pid=process.pid)
    await _send_cancel(process)
    await _escalate(process, grace_s, term_s, bound)


async def _send_cancel(process: WorkerProcess) -> None:
    if process.stdin is None:
        return
    try:
        process.stdin.write(b"cancel\n")
        await process.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):  # it is exiting already
        pass


async def _escalate(process: WorkerProcess, grace_s: float, term_s: float, bound: Any) -> None:
    """Wait `grace_s` for a clean exit, then SIGTERM the group, then SIGKILL it."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, term_s)):
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), wait_s)
            return
        except TimeoutError:
            bound.warning("worker did not stop in time", pid=process.pid, signal=sig.name, waited_s=wait_s)
            kill_process_group(process.pid, sig)


_background: set[asyncio.Task[None]] = set()


def _abandon(process: WorkerProcess, grace_s: float, term_s: float, bound: Any) -> None:
    """Our caller went away mid-run: close stdin so the worker stops itself, and make sure it does."""
    if process.stdin is not None:
        process.stdin.close()
    task = asyncio.get_running_loop().create_task(_escalate(process, grace_s, term_s, bound))
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _kill_and_reap(pipe: MessagePipe) -> None:
    kill_process_group(pipe.pid)
    with contextlib.suppress(ProcessLookupError, asyncio.CancelledError):
        await asyncio.shield(pipe.process.wait())


def _exit_report(
    pid: int, returncode: int, seen: _Seen, log_path: Path, oom_before: int | None, bound: Any
) -> WorkerExit:
    sig = None
    if returncode < 0:
        with contextlib.suppress(ValueError):
            sig = signal.Signals(-returncode)
    tail = read_log_tail(log_path)
    oom = False
    if sig == signal.SIGKILL and seen.final is None:
        oom_after = cgroup_oom_kills()
        counter_rose = oom_before is not None and oom_after is not None and oom_after > oom_before
        oom = counter_rose or any(_OOM_WORDS.search(line) for line in tail)
    bound.info(
        "worker exited",
        pid=pid,
        returncode=returncode,
        signal=sig.name if sig else None,
        final=seen.final.TYPE if seen.final else None,
        oom_killed=oom,
    )
    return WorkerExit(
        pid=pid,
        returncode=returncode,
        signal=sig,
        final=seen.final,
        log_tail=tail,
        oom_killed=oom,
        started=seen.started,
    )


def _unbuffered_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """`env` (default: ours) with unbuffered output: a traceback reaches the log even when the worker dies after it."""
    return {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}


# --- a training attempt ----------------------------------------------------------------------------------------------


def spec_path_for(spec: WorkerSpec) -> Path:
    return JobDir(Path(spec.output_dir)).worker_spec


def worker_env(spec: WorkerSpec, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The training worker's environment: `env` (default: ours), its slot's GPU as CUDA_VISIBLE_DEVICES (which the
    executor derived from the server's own list, `gpu_slots`), unbuffered."""
    return training_env(spec.cuda_visible_devices, env)


def training_env(cuda_visible_devices: str | None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`worker_env` for a slot whose GPUs are `cuda_visible_devices` (None: the server's own)."""
    out = _unbuffered_env(env)
    if cuda_visible_devices is not None:
        out[CUDA_VISIBLE_DEVICES] = cuda_visible_devices
    return out


async def run_worker(
    spec: WorkerSpec,
    *,
    on_message: OnMessage,
    cancel: asyncio.Event,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cancel_grace_s: float = 15,
    term_grace_s: float = 5,
    launcher: WorkerLauncher | None = None,
) -> WorkerExit:
    """Run one training attempt to its end (see `supervise` for how `cancel` stops it). The spec is left in the job's
    folder, beside its log."""
    return await supervise(
        train_worker.WORKER_MODULE,
        spec.write(spec_path_for(spec)),
        on_message=on_message,
        log_path=log_path,
        env=worker_env(spec, env),
        bound=log.bind(job_id=spec.job_id, gpu_slot=spec.gpu_slot),
        cancel=cancel,
        cancel_grace_s=cancel_grace_s,
        term_grace_s=term_grace_s,
        launcher=launcher,
    )


# --- an export -------------------------------------------------------------------------------------------------------


async def run_export(
    spec: Mapping[str, Any],
    *,
    on_progress: OnProgress,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    launcher: WorkerLauncher | None = None,
) -> dict[str, Any]:
    """Run one export in a worker subprocess; await `on_progress` for each progress message, in order.

    Returns the artifact manifest (`ArtifactManifest.to_dict()`). Raises the worker's FinetuneError for a typed
    failure, and FinetuneError(UNAVAILABLE, EXPORT_CRASHED) with the log's tail when it died without a final message.
    If this coroutine is cancelled, the worker's process group is killed and its staging folder removed.
    """
    checked = ExportSpec.from_dict(spec)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    target_dir = Path(checked.target_dir)
    fd, name = tempfile.mkstemp(dir=log_path.parent, prefix=layout.EXPORT_SPEC_TEMP_PREFIX, suffix=".json")
    os.close(fd)
    spec_path = checked.write(Path(name))

    async def relay_progress(message: Message) -> None:
        if isinstance(message, ExportProgress):
            await on_progress(message)

    bound = log.bind(target=target_dir.name, format=checked.fmt)
    host_has_gpus = count_gpus(await asyncio.to_thread(detect_devices)) > 0  # nvidia-smi: off the event loop
    try:
        exit_ = await supervise(
            export_worker.WORKER_MODULE,
            spec_path,
            on_message=relay_progress,
            log_path=log_path,
            env=export_env(checked, env, host_has_gpus=host_has_gpus),
            bound=bound,
            launcher=launcher,
        )
    except BaseException:
        remove_staging(target_dir)
        raise
    finally:
        spec_path.unlink(missing_ok=True)
    if isinstance(exit_.final, Artifact):
        return dict(exit_.final.data)
    if isinstance(exit_.final, Error):
        raise exit_.final.to_exception()
    remove_staging(target_dir)  # a killed worker cannot clean up after itself
    bound.warning("export worker crashed", returncode=exit_.returncode)
    raise _export_crashed(exit_, log_path)


def export_env(spec: ExportSpec, env: Mapping[str, str] | None = None, *, host_has_gpus: bool) -> dict[str, str]:
    """The export worker's environment: a merge on the CPU (the default) sees no GPU at all, so neither it nor a
    library it imports makes a CUDA context on a GPU a training job is using. On a host without GPUs there is
    nothing to hide, and the environment stays the training workers' own: an export then forks from their warm
    fork server instead of starting one of its own (~10 s of imports)."""
    out = _unbuffered_env(env)
    if host_has_gpus and not (spec.device or "cpu").startswith("cuda"):
        out[CUDA_VISIBLE_DEVICES] = ""
    return out


def _export_crashed(exit_: WorkerExit, log_path: Path) -> FinetuneError:
    how = f"signal {-exit_.returncode}" if exit_.returncode < 0 else f"exit code {exit_.returncode}"
    return FinetuneError(
        ErrorKind.UNAVAILABLE,
        "EXPORT_CRASHED",
        f"the export worker ended with {how} before finishing; last log lines:\n"
        + "\n".join(exit_.log_tail[-CRASH_TAIL_LINES:]),
        hint="Out of memory is the usual cause of a merge that dies: export the ADAPTER, or free memory and retry.",
        metadata={"returncode": str(exit_.returncode), "log": str(log_path)},
    )


# --- a generation worker ---------------------------------------------------------------------------------------------


async def run_generate(
    spec: GenerateSpec,
    *,
    on_message: OnMessage,
    commands: asyncio.Queue[bytes | None],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    launcher: WorkerLauncher | None = None,
) -> WorkerExit:
    """Run one generation worker until its stdin closes (None in `commands`) or it dies; requests go in through
    `commands` (`generate_worker.command_line`), its messages come out through `on_message`. Cancelling this
    coroutine kills the worker's group. On a GPU host it sees every device and uses the first: it shares it with the
    training slots."""
    log_path = Path(log_path)
    # A name of its own: a worker of the same number may be starting while this one's run still ends.
    fd, name = tempfile.mkstemp(dir=log_path.parent, prefix=f".{log_path.stem}-spec-", suffix=".json")
    os.close(fd)
    spec_path = spec.write(Path(name))
    try:
        return await supervise(
            generate_worker.WORKER_MODULE,
            spec_path,
            on_message=on_message,
            log_path=log_path,
            env=_unbuffered_env(env),
            bound=log.bind(worker=log_path.stem, model=spec.model_ref, job_id=spec.job_id),
            commands=commands,
            launcher=launcher,
        )
    finally:
        spec_path.unlink(missing_ok=True)
