"""Jobs on a Ray cluster: each attempt is one actor, named after its job, that runs the same worker as locally.

The actor (`_Attempt`) asks for the job's GPUs and CPUs, runs `supervisor.run_worker` on its node (so the worker's
log file, cancel escalation, OOM detection and exit report are exactly the local ones) and streams the worker's
typed messages back as they happen, ending with its `WorkerExit`. Its name (the job id, in the server's namespace)
means two attempts of one job can never run at once anywhere on the cluster. It is owned by this server's Ray
driver: a server that dies takes its actors with it, and a worker whose actor died sees its stdin close and exits.

Cancel: the actor's worker gets the local escalation (a "cancel" line, SIGTERM, SIGKILL); an actor still there after
those graces is killed. An actor or node that dies is a crash (no final word), so the job resumes from its newest
checkpoint within the usual retry limit. With `workers_per_job` > 1 the actor only relays: the attempt runs over Ray
Train workers that hold the resources (`ray_train.py`). Only these two modules import ray, and only `--executor ray`
imports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import ray
import structlog
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from finetune_server.settings import RaySettings, ServerSettings
from finetune_server.workers.executor import ExecutorUnavailableError
from finetune_server.workers.process import read_log_tail
from finetune_server.workers.protocol import Event, Message, Started
from finetune_server.workers.supervisor import OnMessage, WorkerExit, run_worker
from finetune_server.workers.train import WorkerSpec

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S = 5.0  # for the TCP check of the head's address: ray.init itself retries for minutes
STORAGE_CHECK_TIMEOUT_S = 120.0
STORAGE_CHECK_DIR = ".ray-storage-check"  # under the data dir; emptied after the check
PLACEMENT_NOTICE_S = 5.0  # an actor not started by then is waiting for resources: the job's events say so
KILL_MARGIN_S = 5.0  # beyond the worker's own graces, before its actor is killed
NAME_WAIT_S = 60.0  # how long a new attempt waits for the previous one's actor name to be released

# The server's environment that the actor and its worker need: Ray processes do not inherit the server's.
# CUDA_VISIBLE_DEVICES is never among them: on the node, Ray sets it to the GPUs it gave the actor.
_FORWARDED_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "FINETUNE_")
_FORWARDED_NAMES = ("PYTHONPATH",)


def forwarded_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables of `environ` a job's actor gets: hub cache and offline settings, fault flags, the import path."""
    return {k: v for k, v in environ.items() if k.startswith(_FORWARDED_PREFIXES) or k in _FORWARDED_NAMES}


# --- on the cluster --------------------------------------------------------------------------------------------------


@ray.remote(max_restarts=0, max_task_retries=0)
class _Attempt:
    """One attempt of one job: its worker subprocess on this actor's node, its messages streamed to the server."""

    def __init__(self) -> None:
        self._cancel = asyncio.Event()

    async def node(self) -> str:
        """Where the actor runs (awaiting it also tells that the cluster has placed it)."""
        return str(ray.util.get_node_ip_address())

    async def cancel(self) -> None:
        self._cancel.set()

    async def stopping(self) -> bool:
        """Whether the attempt is being cancelled (the ranks of a multi-worker attempt poll it)."""
        return self._cancel.is_set()

    async def run_ddp(
        self, spec: WorkerSpec, log_path: str, options: RaySettings
    ) -> AsyncIterator[Message | WorkerExit]:
        """Like `run`, over `options.workers_per_job` Ray Train workers (see `ray_train`)."""
        from finetune_server.workers.ray_train import ddp_attempt

        me = ray.get_runtime_context().current_actor
        async for item in ddp_attempt(me, spec, log_path, options):
            yield item

    async def run(
        self, spec: WorkerSpec, log_path: str, cancel_grace_s: float, term_grace_s: float
    ) -> AsyncIterator[Message | WorkerExit]:
        """The worker's messages in order, as they come, then its WorkerExit (a streaming generator)."""
        queue: asyncio.Queue[Message | WorkerExit | BaseException] = asyncio.Queue()

        async def attempt() -> None:
            try:
                exit_ = await run_worker(
                    spec,
                    on_message=queue.put,
                    cancel=self._cancel,
                    log_path=Path(log_path),
                    cancel_grace_s=cancel_grace_s,
                    term_grace_s=term_grace_s,
                )
            except BaseException as exc:  # re-raised to the server, which takes it as a crash
                await queue.put(exc)
                raise
            await queue.put(exit_)

        task = asyncio.create_task(attempt())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, WorkerExit):
                    return
        finally:
            if not task.done():  # the server stopped reading: the worker stops as if its server had died
                task.cancel()


@ray.remote(num_cpus=0, max_retries=0)
def _write_marker(path: str, token: str) -> str:
    """Write `token` into `path` on this node, without creating folders: a data dir it cannot see fails here."""
    Path(path).write_text(token, encoding="utf-8")
    return str(ray.util.get_node_ip_address())


# --- on the server ---------------------------------------------------------------------------------------------------


class RayExecutor:
    """One named actor per attempt on a Ray cluster this process is connected to (`connect`)."""

    def __init__(self, options: RaySettings, *, cancel_grace_s: float = 15, term_grace_s: float = 5) -> None:
        self._options = options
        self._cancel_grace_s = cancel_grace_s
        self._term_grace_s = term_grace_s

    @classmethod
    async def connect(cls, settings: ServerSettings) -> RayExecutor:
        """Join the cluster and check every node sees the data dir; ExecutorUnavailableError with one line if not."""
        await asyncio.to_thread(_join, settings.ray)
        await asyncio.to_thread(check_shared_storage, settings.data_dir)
        executor = cls(settings.ray)
        problem = await asyncio.to_thread(executor.placement_problem)
        if problem:  # GPU nodes may join later: jobs are refused until one does
            log.warning("ray.jobs_do_not_fit_yet", problem=problem)
        return executor

    async def prewarm(self, slots: int) -> None:
        """Nothing to do: each attempt's actor starts its worker on its node."""

    def placement_problem(self) -> str | None:
        gpus, cpus, workers = self._options.gpus_per_job, self._options.cpus_per_job, self._options.workers_per_job
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        room = sum(min(_times(node.get("GPU", 0), gpus), _times(node.get("CPU", 0), cpus)) for node in nodes)
        if room >= workers:
            return None
        asks = f"{_amount(gpus, 'GPU')} and {_amount(cpus, 'CPU')} on one node (--ray-gpus-per-job, --ray-cpus-per-job)"
        if room > 0:  # each worker fits somewhere, not all of them at once
            return f"a job asks for {workers} Ray Train workers of {asks}; this Ray cluster has room for {room}"
        largest: dict[str, float] = max(nodes, key=lambda node: (node.get("GPU", 0), node.get("CPU", 0)), default={})
        return (
            f"a job asks for {asks} and no node of this Ray cluster has that much; the largest has"
            f" {_amount(largest.get('GPU', 0), 'GPU')} and {_amount(largest.get('CPU', 0), 'CPU')}"
        )

    async def stop_leftover(self, job_dir: Path) -> None:
        """An actor of a crashed server died with it; one that is somehow still there is killed."""
        with contextlib.suppress(ValueError):  # no such actor: nothing left over
            ray.kill(ray.get_actor(job_dir.name, namespace=self._options.namespace), no_restart=True)

    async def run(
        self, spec: WorkerSpec, *, on_message: OnMessage, cancel: asyncio.Event, log_path: Path
    ) -> WorkerExit:
        bound = log.bind(job_id=spec.job_id)
        try:
            actor = await self._create(spec.job_id, on_message, cancel, bound)
        except _NotStarted as why:
            return _lost(None, log_path, str(why))
        try:
            node = await self._placed(actor, on_message, cancel)
            resources = f"{_amount(self._options.gpus_per_job, 'GPU')}, {_amount(self._options.cpus_per_job, 'CPU')}"
            workers = self._options.workers_per_job
            where = (
                f"{workers} Ray Train workers ({resources} each), led from the Ray node {node}"
                if workers > 1
                else f"the Ray node {node} ({resources})"
            )
            await on_message(_log_event("INFO", f"the attempt runs on {where}"))
            bound.info("ray.attempt_started", node=node)
            return await self._relay(actor, self._on_node(spec), on_message, cancel, log_path, bound)
        except _NotStarted as why:
            return _lost(None, log_path, str(why))
        finally:
            ray.kill(actor, no_restart=True)  # frees its name and resources now, not when its handle is collected

    def _on_node(self, spec: WorkerSpec) -> WorkerSpec:
        """The spec as the actor's node runs it: the GPUs Ray gave the actor (its CUDA_VISIBLE_DEVICES, seen as
        cuda:0...), the actor's CPUs as threads, no host-specific slot or pinning."""
        device = "cpu" if self._options.gpus_per_job == 0 else spec.device
        threads = max(1, int(self._options.cpus_per_job))
        return dataclasses.replace(spec, gpu_slot=None, cpus=None, cpu_threads=threads, device=device)

    async def _create(self, job_id: str, on_message: OnMessage, cancel: asyncio.Event, bound: Any) -> Any:
        """The attempt's actor; while an earlier attempt's actor still holds the name, wait (bounded) for it."""
        ddp = self._options.workers_per_job > 1  # the actor only relays: its Ray Train workers hold the resources
        options = {
            "name": job_id,
            "namespace": self._options.namespace,
            "num_gpus": 0 if ddp else self._options.gpus_per_job,
            "num_cpus": 0 if ddp else self._options.cpus_per_job,
        }
        deadline = time.monotonic() + NAME_WAIT_S
        told = False
        while True:
            try:
                return await asyncio.to_thread(lambda: _Attempt.options(**options).remote())  # type: ignore[attr-defined]
            except ValueError:  # the name is taken
                if time.monotonic() > deadline:
                    raise _NotStarted(f"an earlier attempt's Ray actor still held the name {job_id}") from None
                if not told:
                    told = True
                    bound.info("ray.waiting_for_previous_attempt")
                    await on_message(_log_event("INFO", "waiting for the previous attempt's Ray actor to stop"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cancel.wait(), 0.5)
            if cancel.is_set():
                raise _NotStarted("the job was cancelled before its Ray actor started")

    async def _placed(self, actor: Any, on_message: OnMessage, cancel: asyncio.Event) -> str:
        """The node the actor started on, once the cluster placed it; _NotStarted if cancelled or lost before."""
        ready: asyncio.Future[str] = asyncio.ensure_future(actor.node.remote())
        cancelled: asyncio.Future[Any] = asyncio.ensure_future(cancel.wait())
        try:
            first = asyncio.FIRST_COMPLETED
            done, _ = await asyncio.wait({ready, cancelled}, timeout=PLACEMENT_NOTICE_S, return_when=first)
            if not done:
                await on_message(_log_event("INFO", self._waiting_message()))
                done, _ = await asyncio.wait({ready, cancelled}, return_when=first)
            if ready not in done:
                raise _NotStarted("the job was cancelled while it waited for the Ray cluster")
            try:
                return ready.result()
            except RayError as exc:  # e.g. its node died, or its worker process could not start
                raise _NotStarted(_death_cause(exc)) from None
        finally:
            cancelled.cancel()
            if not ready.done():
                ready.cancel()

    def _waiting_message(self) -> str:
        free = ray.available_resources()
        return (
            f"waiting for the Ray cluster to place this job: it needs {_amount(self._options.gpus_per_job, 'GPU')}"
            f" and {_amount(self._options.cpus_per_job, 'CPU')} on one node; free now in the whole cluster:"
            f" {_amount(free.get('GPU', 0), 'GPU')}, {_amount(free.get('CPU', 0), 'CPU')}"
        )

    async def _relay(
        self,
        actor: Any,
        spec: WorkerSpec,
        on_message: OnMessage,
        cancel: asyncio.Event,
        log_path: Path,
        bound: Any,
    ) -> WorkerExit:
        started: list[Started] = []

        async def consume() -> WorkerExit:
            if self._options.workers_per_job > 1:
                stream = actor.run_ddp.options(num_returns="streaming").remote(spec, str(log_path), self._options)
            else:
                stream = actor.run.options(num_returns="streaming").remote(
                    spec, str(log_path), self._cancel_grace_s, self._term_grace_s
                )
            async for ref in stream:
                item = await ref
                if isinstance(item, WorkerExit):
                    return item
                if isinstance(item, Started):
                    started.append(item)
                await on_message(item)
            raise RuntimeError("the attempt's stream ended without the worker's exit report")

        consumer = asyncio.ensure_future(consume())
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({consumer, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if not consumer.done():
                await self._stop(actor, consumer, bound)
            return await consumer
        except RayError as exc:  # the actor, its node or its worker process died: a crash, retried by the caller
            bound.warning("ray.attempt_lost", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return _lost(started[-1] if started else None, log_path, _death_cause(exc))
        finally:
            cancelled.cancel()
            if not consumer.done():
                consumer.cancel()

    async def _stop(self, actor: Any, consumer: asyncio.Future[WorkerExit], bound: Any) -> None:
        """The worker's own escalation on its node; the actor is killed if that has not ended it in time."""
        with contextlib.suppress(RayError):
            await actor.cancel.remote()
        wait_s = self._cancel_grace_s + self._term_grace_s + KILL_MARGIN_S
        done, _ = await asyncio.wait({consumer}, timeout=wait_s)
        if not done:
            bound.warning("ray.killing_actor", waited_s=wait_s)
            ray.kill(actor, no_restart=True)


class _NotStarted(Exception):  # noqa: N818 - an outcome: the attempt ended before its worker started
    """The attempt ends before its worker started; the message says why."""


def _lost(started: Started | None, log_path: Path, cause: str) -> WorkerExit:
    """An attempt without a final word and without an exit status of its own."""
    return WorkerExit(
        pid=started.pid if started else 0,
        returncode=-1,
        signal=None,
        final=None,
        log_tail=read_log_tail(log_path),
        oom_killed=False,
        started=started,
        cause=cause,
    )


def _death_cause(exc: RayError) -> str:
    if isinstance(exc, RayActorError):
        return "its Ray actor died (killed, or its node was lost)"
    return f"its Ray actor failed: {type(exc).__name__}"


def _log_event(level: str, message: str) -> Event:
    return Event(kind="log", data={"level": level, "message": message})


def _times(have: float, need: float) -> int:
    """How many `need` fit in `have` (any number of nothing: capped, it only has to reach a worker count)."""
    return 1 << 20 if need <= 0 else int(have // need)


def _amount(value: float, unit: str) -> str:
    number = f"{value:g}"
    return f"{number} {unit}" if number == "1" else f"{number} {unit}s"


# --- start-up checks -------------------------------------------------------------------------------------------------


def _join(options: RaySettings) -> None:
    """Connect this process to the cluster as a driver, in the settings' namespace, with the forwarded environment."""
    if ray.is_initialized():  # several servers in one process (tests) share one connection
        return
    address = _resolve(options.address)
    try:
        ray.init(
            address=address,
            namespace=options.namespace,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": forwarded_env()},
        )
    except (ConnectionError, RayError, RuntimeError) as exc:
        raise ExecutorUnavailableError(f"cannot join the Ray cluster at {address}: {_first_line(exc)}") from None
    log.info("ray.connected", address=address, namespace=options.namespace)


def _resolve(address: str) -> str:
    """host:port, checked to accept TCP connections (an unreachable head would keep ray.init retrying)."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address("auto")
        if not found:
            raise ExecutorUnavailableError(
                "no Ray cluster found for --ray-address auto (no RAY_ADDRESS, no cluster started on this host)"
            )
        address = found
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorUnavailableError(f"--ray-address must be auto or host:port, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ExecutorUnavailableError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None
    return address


def check_shared_storage(data_dir: Path) -> None:
    """Have a task on every live node write a marker into the data dir and read each here; a node that cannot see
    the data dir at the same path refuses the start."""
    folder = data_dir / STORAGE_CHECK_DIR
    folder.mkdir(exist_ok=True)
    token = uuid.uuid4().hex
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    markers = {node["NodeID"]: folder / f"{token}-{node['NodeID'][:12]}" for node in nodes}
    refs = {
        node_id: _write_marker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
            str(path), token
        )
        for node_id, path in markers.items()
    }
    where = {node["NodeID"]: node.get("NodeManagerAddress", node["NodeID"]) for node in nodes}
    try:
        for node_id, ref in refs.items():
            try:
                ray.get(ref, timeout=STORAGE_CHECK_TIMEOUT_S)
            except (RayError, GetTimeoutError) as exc:
                raise _not_shared(data_dir, where[node_id], f"it could not write there ({_first_line(exc)})") from None
            path = markers[node_id]
            if not path.is_file() or path.read_text(encoding="utf-8") != token:
                raise _not_shared(data_dir, where[node_id], "what it wrote there is not visible here")
    finally:
        for path in markers.values():
            path.unlink(missing_ok=True)
    log.info("ray.storage_checked", nodes=len(nodes), data_dir=str(data_dir))


def _not_shared(data_dir: Path, node: str, why: str) -> ExecutorUnavailableError:
    return ExecutorUnavailableError(
        f"the Ray node {node} cannot see the data dir {data_dir}: {why}; "
        "every node must mount it at the same path (a shared file system)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
