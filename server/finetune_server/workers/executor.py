"""The executor: the seam between the scheduler and whatever runs a job.

`LocalSubprocessExecutor` runs each job attempt in a worker subprocess on this host (`supervisor.run_worker`, on the
host-local plumbing of `process.py`). `ray_executor.RayExecutor` runs each attempt in an actor on a Ray cluster, which
runs that same worker on its node. The scheduler only sees `run(...) -> WorkerExit`, `stop_leftover(...)`,
`placement_problem()` and the protocol's typed messages; `open_executor` is the one place that picks one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from finetune_server.host.devices import detect_devices
from finetune_server.settings import ServerSettings
from finetune_server.storage.layout import JobDir
from finetune_server.workers.process import kill_process_group
from finetune_server.workers.protocol import Message, Started
from finetune_server.workers.supervisor import OnMessage, WorkerExit, run_worker
from finetune_server.workers.train import WorkerSpec


class ExecutorUnavailableError(Exception):
    """The executor cannot run jobs at all (its cluster is unreachable, or cannot see the data dir): the server
    must not start. The message is one line that says what is wrong."""


class Executor(Protocol):
    async def run(
        self, spec: WorkerSpec, *, on_message: OnMessage, cancel: asyncio.Event, log_path: Path
    ) -> WorkerExit:
        """Run one attempt of a job to its end, relaying its messages in order."""
        ...

    async def stop_leftover(self, job_dir: Path) -> None:
        """A server that crashed may have left this job's worker running: make sure it stops before a new attempt."""
        ...

    def placement_problem(self) -> str | None:
        """Why no job could be placed now (it asks for more than any machine has), or None. May block briefly."""
        ...


async def open_executor(settings: ServerSettings) -> Executor:
    """The executor the settings name, connected and checked; ExecutorUnavailableError when it cannot run jobs."""
    if settings.executor == "ray":
        from finetune_server.workers.ray_executor import RayExecutor  # ray is imported only here

        return await RayExecutor.connect(settings)
    return LocalSubprocessExecutor()


class LocalSubprocessExecutor:
    """One worker subprocess per attempt, pinned to its GPU slot via CUDA_VISIBLE_DEVICES when the host has GPUs."""

    def __init__(
        self, *, env: Mapping[str, str] | None = None, cancel_grace_s: float = 15, term_grace_s: float = 5
    ) -> None:
        self._env = env
        self._cancel_grace_s = cancel_grace_s
        self._term_grace_s = term_grace_s

    async def run(
        self, spec: WorkerSpec, *, on_message: OnMessage, cancel: asyncio.Event, log_path: Path
    ) -> WorkerExit:
        pid_file = JobDir(Path(spec.output_dir)).worker_pid

        async def relay(message: Message) -> None:
            if isinstance(message, Started):  # its process group id, so that a restarted server can stop an orphan
                pid_file.write_text(str(message.pid))
            await on_message(message)

        try:
            return await run_worker(
                await self._place(spec),
                on_message=relay,
                cancel=cancel,
                log_path=log_path,
                env=self._env,
                cancel_grace_s=self._cancel_grace_s,
                term_grace_s=self._term_grace_s,
            )
        finally:
            pid_file.unlink(missing_ok=True)

    async def stop_leftover(self, job_dir: Path) -> None:
        """An orphan worker stops by itself when its stdin closes (its server died); make sure of it by its pid."""
        pid_file = JobDir(job_dir).worker_pid
        if pid_file.is_file():
            kill_process_group(int(pid_file.read_text().strip() or 0))
            pid_file.unlink(missing_ok=True)

    def placement_problem(self) -> str | None:
        return None  # the slots are this host's

    @staticmethod
    async def _place(spec: WorkerSpec) -> WorkerSpec:
        """Without GPUs a slot means nothing (the CPU is shared): drop it rather than hide devices that do not exist.

        With one, the worker sees only its GPU, as cuda:0.
        """
        if spec.gpu_slot is None:
            return spec
        devices = await asyncio.to_thread(detect_devices)  # nvidia-smi: keep it off the event loop
        if not any(d.name.startswith("cuda") for d in devices):
            return dataclasses.replace(spec, gpu_slot=None)
        device = spec.device if spec.device in (None, "cpu") else "cuda:0"
        return dataclasses.replace(spec, device=device)
