"""Generate: answer a chat with a base model, a job's adapter or checkpoint, or an artifact, in warm worker processes.

Each worker (`workers/generate.py`, run by `supervisor.run_generate`) holds one model and answers one request at a
time. A request goes to an idle worker that holds its model; else a new worker starts while there are fewer than
`max_generate_workers`; else an idle worker holding another model is stopped to make room. When every worker is
busy the call is refused at once (RESOURCE_EXHAUSTED, GENERATE_BUSY, with a RetryInfo) rather than queued: a chat
caller retries in a second or two, and a queue would hold its connection for an unknown time. The one wait is for a
worker whose caller has just gone: it stops at its next token, so a request waits for it (up to FREEING_WAIT_S).
A worker idle for `generate_idle_s` has its stdin closed and exits, freeing its memory. At shutdown every worker's
stdin is closed before the calls drain: an answer in progress ends at once with the finish reason `cancelled`.

Workers are apart from the training slots (a busy slot never refuses a chat, and a chat never holds a slot); on a
GPU host they share the first device with training.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import structlog

from finetune_server.errors import ErrorKind, FinetuneError, Violation, ViolationList
from finetune_server.jobs.checkpoints import job_adapter
from finetune_server.settings import ServerSettings
from finetune_server.storage.records import ArtifactRecord, JobRecord
from finetune_server.training.config import TrainingConfig
from finetune_server.training.data.formats import ROLES
from finetune_server.training.model_source import resolve_model
from finetune_server.util.aio import get_unless_done
from finetune_server.workers.generate import CANCEL_LINE, GenerateCommand, GenerateSpec
from finetune_server.workers.protocol import (
    Error,
    GenerateDone,
    GeneratedText,
    GenerateReady,
    GenerateRefused,
    Message,
)
from finetune_server.workers.supervisor import CRASH_TAIL_LINES, WorkerExit, run_generate
from finetune_server.workers.warm_pool import FreshLauncher, WorkerLauncher

log = structlog.get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
FREEING_WAIT_S = 10.0  # a worker told to stop answers within a token; this only bounds a stuck one
EXIT_WAIT_S = 10.0  # for a worker whose stdin was closed to exit before it is killed


@dataclass(frozen=True)
class ChatRequest:
    """A Generate request in domain terms (the proto's GenerateRequest, unset fields as None)."""

    messages: list[tuple[str, str]]
    model_name: str = ""
    job_id: str = ""
    checkpoint_step: int | None = None
    artifact_id: str = ""
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationTarget:
    """What answers: the worker spec that loads it, and the base model's name for people."""

    spec: GenerateSpec
    base_model: str


@dataclass(frozen=True)
class GenerationFinish:
    """The end of one answer (the contract's GenerateFinish; `reason` is a protocol finish reason)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    base_model: str
    step: int


def check_request(request: ChatRequest, settings: ServerSettings) -> GenerateCommand:
    """The worker's command for a valid request; INVALID_ARGUMENT with every violation otherwise."""
    problems = ViolationList()
    named = [name for name in ("model_name", "job_id", "artifact_id") if getattr(request, name)]
    if len(named) != 1:
        got = f" (got {', '.join(named)})" if named else ""
        message = f"name exactly one of model_name, job_id and artifact_id{got}"
        problems.add(named[1] if len(named) > 1 else "job_id", "ONE_TARGET", message)
    if request.checkpoint_step is not None and not request.job_id:
        problems.add("checkpoint_step", "NEEDS_JOB", "checkpoint_step needs job_id")
    if request.checkpoint_step is not None and request.checkpoint_step < 1:
        problems.add("checkpoint_step", "OUT_OF_RANGE", f"must be >= 1, got {request.checkpoint_step}")
    if not request.messages:
        problems.add("messages", "REQUIRED", "at least one message is needed")
    for index, (role, _content) in enumerate(request.messages):
        if role not in ROLES:
            problems.add(f"messages[{index}].role", "UNKNOWN_ROLE", f"{role!r} is not one of {', '.join(ROLES)}")
    limit = settings.max_new_tokens_limit
    max_new = request.max_new_tokens if request.max_new_tokens is not None else min(DEFAULT_MAX_NEW_TOKENS, limit)
    if not 1 <= max_new <= limit:
        problems.add("max_new_tokens", "OUT_OF_RANGE", f"must be 1 to this server's limit of {limit}, got {max_new}")
    temperature = 0.0 if request.temperature is None else request.temperature
    if not 0 <= temperature <= 100:  # also refuses NaN
        problems.add("temperature", "OUT_OF_RANGE", f"must be >= 0 (0: greedy), got {temperature}")
    top_p = 1.0 if request.top_p is None else request.top_p
    if not 0 < top_p <= 1:
        problems.add("top_p", "OUT_OF_RANGE", f"must be in (0, 1], got {top_p}")
    if len(request.stop) > MAX_STOP_STRINGS:
        problems.add("stop", "TOO_MANY", f"at most {MAX_STOP_STRINGS} stop strings, got {len(request.stop)}")
    for index, text in enumerate(request.stop):
        if not 1 <= len(text) <= MAX_STOP_CHARS:
            problems.add(f"stop[{index}]", "OUT_OF_RANGE", f"must be 1 to {MAX_STOP_CHARS} characters")
    if problems:
        raise _invalid(problems.items)
    return GenerateCommand(
        messages=[{"role": role, "content": content} for role, content in request.messages],
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=top_p,
        seed=request.seed,
        stop=list(request.stop),
    )


def _invalid(violations: list[Violation]) -> FinetuneError:
    summary = "; ".join(f"{v.field}: {v.message}" for v in violations)
    return FinetuneError(ErrorKind.INVALID_ARGUMENT, "INVALID_GENERATE_REQUEST", summary, violations=violations)


class _Worker:
    """One generation worker process and the request it is answering, if any."""

    def __init__(self, number: int, spec: GenerateSpec, settings: ServerSettings, launcher: WorkerLauncher) -> None:
        self.number = number
        self.key = spec.key()
        self.spec = spec
        self.busy = False  # answering a request, or finishing one whose caller went
        self.stopping = False  # told to stop; busy until its `done` arrives
        self.freed = asyncio.Event()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.commands: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._messages: asyncio.Queue[Message] = asyncio.Queue()
        self.ready: GenerateReady | None = None
        self.log_path = settings.layout.generate_log(number)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.task: asyncio.Task[WorkerExit] = asyncio.create_task(
            run_generate(
                spec, on_message=self._messages.put, commands=self.commands, log_path=self.log_path, launcher=launcher
            )
        )

    @property
    def ended(self) -> bool:
        return self.task.done()

    async def next(self) -> Message | None:
        """The worker's next message; None once it has ended and every message it sent was read."""
        if self._messages.empty() and not self.task.done():
            message = await get_unless_done(self._messages, self.task)
            if message is not None:
                return message
        return None if self._messages.empty() else self._messages.get_nowait()

    async def wait_ready(self) -> GenerateReady:
        while self.ready is None:
            message = await self.next()
            if message is None:
                raise self.failure()
            if isinstance(message, GenerateReady):
                self.ready = message
        return self.ready

    def failure(self) -> FinetuneError:
        """Why the worker ended: its typed error (a model it could not load), else a crash with its log's tail."""
        exit_ = self.task.result() if self.task.done() and not self.task.cancelled() else None
        if exit_ is not None and isinstance(exit_.final, Error):
            return exit_.final.to_exception()
        tail = "\n".join(exit_.log_tail[-CRASH_TAIL_LINES:]) if exit_ is not None else ""
        return FinetuneError(
            ErrorKind.UNAVAILABLE,
            "GENERATE_CRASHED",
            f"the generation worker ended before answering; last log lines:\n{tail}",
            hint="Out of memory is the usual cause: a smaller model, or fewer generation workers.",
            metadata={"log": str(self.log_path)},
        )

    def close(self) -> None:
        """Close its stdin: it stops what it runs and exits."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.commands.put_nowait(None)


class GenerateService:
    def __init__(self, settings: ServerSettings, launcher: WorkerLauncher | None = None) -> None:
        self._settings = settings
        self._launcher = launcher or FreshLauncher()
        self._workers: list[_Worker] = []  # alive, at most max_generate_workers
        self._leaving: set[asyncio.Task[Any]] = set()
        self._closing = False

    # --- what answers ----------------------------------------------------------------------------------------------

    def _spec(self, model_ref: str, **fields: Any) -> GenerateSpec:
        settings = self._settings
        return GenerateSpec(
            model_ref=model_ref,
            hub_cache_dir=str(settings.hf_cache_dir) if settings.hf_cache_dir else None,
            hub_offline=settings.offline,
            cpu_threads=settings.threads_per_worker,
            cpus=settings.worker_cpus or None,
            **fields,
        )

    async def base_target(self, model_name: str) -> GenerationTarget:
        model = await asyncio.to_thread(resolve_model, model_name, self._settings)
        return GenerationTarget(self._spec(model.load_ref), model_name)

    async def job_target(self, job: JobRecord, checkpoint_step: int | None) -> GenerationTarget:
        """A job's final adapter (FAILED_PRECONDITION until it has one) or one of its checkpoints (NOT_FOUND)."""
        job_dir = self._settings.layout.job(job.id).root
        await asyncio.to_thread(
            job_adapter, job, job_dir, checkpoint_step, job_field="job_id", step_field="checkpoint_step"
        )
        base = TrainingConfig.from_dict(job.config).model_name
        model = await asyncio.to_thread(resolve_model, base, self._settings)
        spec = self._spec(
            model.load_ref, job_id=job.id, job_dir=str(job_dir), checkpoint_step=checkpoint_step, config=job.config
        )
        return GenerationTarget(spec, base)

    async def artifact_target(self, artifact: ArtifactRecord) -> GenerationTarget:
        """An exported artifact: a merged model loads alone, an adapter on the base its job trained (the artifact
        records it, so this works after the job was deleted)."""
        folder = self._settings.data_dir / artifact.path
        if not folder.is_dir():
            raise FinetuneError(ErrorKind.DATA_LOSS, "FILE_MISSING", f"artifact {artifact.id} is missing on the server")
        fields = {"job_id": artifact.job_id, "artifact_dir": str(folder), "artifact_step": artifact.step}
        if artifact.format == "MERGED":
            return GenerationTarget(self._spec(str(folder), **fields), artifact.base_model)
        model = await asyncio.to_thread(resolve_model, artifact.base_model, self._settings)
        return GenerationTarget(self._spec(model.load_ref, **fields), artifact.base_model)

    # --- answering -------------------------------------------------------------------------------------------------

    async def generate(
        self, target: GenerationTarget, command: GenerateCommand
    ) -> AsyncGenerator[str | GenerationFinish]:
        """The answer's text pieces as the worker decodes them, then its finish. A caller that stops reading (or
        is cancelled) stops the generation: the worker is told at once and is free again at its next token."""
        worker = await self._acquire(target.spec)
        bound = log.bind(worker=worker.number, job_id=target.spec.job_id)
        finished = sent = released = False
        try:
            ready = await worker.wait_ready()
            worker.commands.put_nowait(command.line())
            sent = True
            while True:
                message = await worker.next()
                if message is None:
                    finished = True
                    raise worker.failure()
                if isinstance(message, GeneratedText):
                    yield message.text
                elif isinstance(message, GenerateRefused):
                    finished = True
                    raise message.to_exception()
                elif isinstance(message, GenerateDone):
                    finished = True
                    bound.info("generate.done", finish_reason=message.finish_reason, tokens=message.completion_tokens)
                    self._release(worker)  # before the caller hears the end: its next request finds the worker free
                    released = True
                    yield GenerationFinish(
                        message.finish_reason,
                        message.prompt_tokens,
                        message.completion_tokens,
                        target.base_model,
                        ready.step,
                    )
                    return
        finally:
            if released:
                pass  # and maybe claimed by the next request already
            elif finished or not sent:
                self._release(worker)
            else:  # the caller went mid-answer
                self._stop_answer(worker, bound)

    async def _acquire(self, spec: GenerateSpec) -> _Worker:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FREEING_WAIT_S
        key = spec.key()
        while True:
            if self._closing:
                raise FinetuneError(
                    ErrorKind.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down", hint="Retry on another."
                )
            idle = [w for w in self._workers if not w.busy and not w.ended]
            worker = next((w for w in idle if w.key == key), None)
            if worker is None and len(self._workers) >= self._settings.max_generate_workers and idle:
                self._retire(idle[0], "making room for another model")
            if worker is None and len(self._workers) < self._settings.max_generate_workers:
                worker = self._start(spec)
            if worker is not None:
                if worker.idle_timer is not None:
                    worker.idle_timer.cancel()
                worker.busy = True
                worker.freed.clear()
                return worker
            freeing = [w for w in self._workers if w.stopping]
            if not freeing or loop.time() >= deadline:
                raise FinetuneError(
                    ErrorKind.RESOURCE_EXHAUSTED,
                    "GENERATE_BUSY",
                    f"all {self._settings.max_generate_workers} generation workers are busy",
                    hint="Retry in a moment, or start the server with a larger --max-generate-workers.",
                )
            waits = [asyncio.ensure_future(w.freed.wait()) for w in freeing]
            try:
                await asyncio.wait(waits, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    def _start(self, spec: GenerateSpec) -> _Worker:
        used = {w.number for w in self._workers}
        number = next(n for n in itertools.count() if n not in used)  # so worker logs stay few: worker-0.log, ...
        worker = _Worker(number, spec, self._settings, self._launcher)
        self._workers.append(worker)
        worker.task.add_done_callback(lambda _: self._ended(worker))
        log.info("generate.worker_started", worker=number, model=spec.model_ref, job_id=spec.job_id)
        return worker

    def _ended(self, worker: _Worker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        worker.freed.set()
        if not worker.task.cancelled() and worker.task.exception() is not None:  # retrieved: nobody may await it
            log.warning("generate.worker_failed", worker=worker.number, error=str(worker.task.exception()))

    def _release(self, worker: _Worker) -> None:
        worker.busy = worker.stopping = False
        worker.freed.set()
        if worker.ended:
            return
        idle_s = self._settings.generate_idle_s
        worker.idle_timer = asyncio.get_running_loop().call_later(
            idle_s, self._retire, worker, f"idle for {idle_s:g} s"
        )

    def _retire(self, worker: _Worker, why: str) -> None:
        if worker.busy or worker not in self._workers:
            return
        self._workers.remove(worker)
        log.info("generate.worker_retired", worker=worker.number, why=why)
        worker.close()
        task = asyncio.ensure_future(self._reap(worker))
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def _reap(self, worker: _Worker) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(worker.task), EXIT_WAIT_S)
        except TimeoutError:
            worker.task.cancel()  # supervise kills its process group
        except Exception:  # its failure was logged by _ended
            pass

    def _stop_answer(self, worker: _Worker, bound: Any) -> None:
        """Tell the worker to stop now; it is free again once its `done` (for this request) arrives."""
        worker.stopping = True
        worker.commands.put_nowait(f"{CANCEL_LINE}\n".encode())
        bound.info("generate.stopping", reason="the caller went")

        async def drain() -> None:
            while (message := await worker.next()) is not None:
                if isinstance(message, GenerateDone | GenerateRefused):
                    reason = message.finish_reason if isinstance(message, GenerateDone) else "refused"
                    bound.info("generate.stopped", finish_reason=reason)
                    break
            self._release(worker)

        task = asyncio.ensure_future(drain())
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    def begin_stop(self) -> None:
        """At shutdown, before the calls drain: no new generation starts, and every worker's stdin is closed, so an
        answer in progress ends at once with CANCELLED (its caller hears why) and the worker exits."""
        self._closing = True
        for worker in self._workers:
            worker.close()

    async def stop(self) -> None:
        """After the calls drained: every worker has exited (or is killed)."""
        self.begin_stop()
        workers, self._workers = list(self._workers), []
        for worker in workers:
            with contextlib.suppress(Exception):
                await self._reap(worker)
        for task in list(self._leaving):
            task.cancel()
