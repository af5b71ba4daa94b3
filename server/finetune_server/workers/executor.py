"""The executor: the seam between the scheduler and whatever runs a job.

`LocalSubprocessExecutor` runs each job attempt in a worker subprocess on this host (`supervisor.run_worker`, on the
host-local plumbing of `process.py`). `ray_executor.RayExecutor` runs each attempt in an actor on a Ray cluster, which
runs that same worker on its node. The scheduler only sees `run(...) -> WorkerExit`, `stop_leftover(...)`,
`placement_problem()` and the protocol's typed messages; `open_executor` is the one place that picks one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from finetune_server.errors import FinetuneError
from finetune_server.host.devices import count_gpus, detect_devices
from finetune_server.settings import ServerSettings
from finetune_server.storage.layout import JobDir
from finetune_server.workers.gpu_slots import worker_visible_devices
from finetune_server.workers.process import kill_process_group
from finetune_server.workers.protocol import EXIT_ERROR, Error, Message, Started
from finetune_server.workers.supervisor import OnMessage, WorkerExit, run_worker, training_env
from finetune_server.workers.train import WorkerSpec
from finetune_server.workers.warm_pool import FreshLauncher, WorkerLauncher


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

    async def prewarm(self, slots: int) -> None:
        """Get the first `slots` slots' workers ready to start fast (the warm pool), if this executor can."""
        ...


async def open_executor(settings: ServerSettings, launcher: WorkerLauncher | None = None) -> Executor:
    """The executor the settings name, connected and checked; ExecutorUnavailableError when it cannot run jobs.
    `launcher` starts the local executor's workers (default: fresh processes)."""
    if settings.executor == "ray":
        from finetune_server.workers.ray_executor import RayExecutor  # ray is imported only here

        return await RayExecutor.connect(settings)
    return LocalSubprocessExecutor(launcher=launcher)


class LocalSubprocessExecutor:
    """One worker subprocess per attempt, pinned to its GPU slot via CUDA_VISIBLE_DEVICES when the host has GPUs."""

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        cancel_grace_s: float = 15,
        term_grace_s: float = 5,
        launcher: WorkerLauncher | None = None,
    ) -> None:
        self._env = env
        self._cancel_grace_s = cancel_grace_s
        self._term_grace_s = term_grace_s
        self._launcher = launcher or FreshLauncher()

    async def run(
        self, spec: WorkerSpec, *, on_message: OnMessage, cancel: asyncio.Event, log_path: Path
    ) -> WorkerExit:
        pid_file = JobDir(Path(spec.output_dir)).worker_pid

        async def relay(message: Message) -> None:
            if isinstance(message, Started):  # its process group id, so that a restarted server can stop an orphan
                pid_file.write_text(str(message.pid))
            await on_message(message)

        try:
            placed = await self._place(spec)
        except FinetuneError as exc:  # no GPU for this slot: the job fails with that, it is not retried
            return WorkerExit(pid=0, returncode=EXIT_ERROR, signal=None, final=Error.from_exception(exc))
        try:
            return await run_worker(
                placed,
                on_message=relay,
                cancel=cancel,
                log_path=log_path,
                env=self._env,
                cancel_grace_s=self._cancel_grace_s,
                term_grace_s=self._term_grace_s,
                launcher=self._launcher,
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

    async def prewarm(self, slots: int) -> None:
        for slot in range(slots):
            visible = await self._visible_devices(slot)
            self._launcher.prewarm(training_env(visible, self._env))

    async def _visible_devices(self, slot: int) -> str | None:
        devices = await asyncio.to_thread(detect_devices)  # nvidia-smi: keep it off the event loop
        return worker_visible_devices(slot, os.environ if self._env is None else self._env, count_gpus(devices))

    async def _place(self, spec: WorkerSpec) -> WorkerSpec:
        """The slot's GPU, numbered within the server's own CUDA_VISIBLE_DEVICES; the worker sees it as cuda:0.

        Without GPUs a slot means nothing (the CPU is shared): drop it rather than hide devices that do not exist.
        A slot beyond the server's GPUs raises NO_GPU_FOR_SLOT instead of training on the CPU.
        """
        if spec.gpu_slot is None:
            return spec
        visible = await self._visible_devices(spec.gpu_slot)
        if visible is None:
            return dataclasses.replace(spec, gpu_slot=None, cuda_visible_devices=None)
        # cuda:0 said outright: a worker whose GPU is unusable fails with CUDA_UNAVAILABLE instead of using the CPU.
        device = "cpu" if spec.device == "cpu" else "cuda:0"
        return dataclasses.replace(spec, device=device, cuda_visible_devices=visible)
