"""The live view of a job for `train` and `watch`: a progress bar with the loop's own metrics, events above it.

Every number comes from the job's events (step/total, loss, learning rate, tokens/s, the loop's ETA, device memory),
so replaying a finished job's stored events draws the same screen as watching it live. On a terminal the bar updates
in place; in a pipe or a log file the events are printed as lines and the bar once, at the end.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Column

from finetune_client import GrpcFineTuneService
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client.convert import state_name
from finetune_server.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    format_bytes,
    format_duration,
)
from finetune_server.cli.render import error_text, styled_state

_LOG_LEVELS = {
    pb.LOG_LEVEL_INFO: "",
    pb.LOG_LEVEL_WARNING: "[yellow]warning:[/] ",
    pb.LOG_LEVEL_ERROR: "[red]error:[/] ",
}
# A SIGINT that lands just before a blocking wait begins only sets Python's flag (the wait has not started, so it is
# not interrupted): waiting in slices lets the flag be seen within this many seconds instead of never.
SIGNAL_CHECK_S = 0.25


class JobDisplay:
    """Shows one job's events as they are applied; use as a context manager around the event loop."""

    def __init__(self, console: Console, job: pb.Job) -> None:
        self.console = console
        self.job_id = job.id
        self._total = job.config.max_steps or None  # epoch-based runs learn their total from the first progress
        self._progress = Progress(
            TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=9)),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[steps]}", table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[metrics]}", table_column=Column(no_wrap=True)),
            console=console,
            transient=False,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task("waiting", total=self._total, steps=self._steps(0), metrics="", start=True)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def apply(self, event: pb.JobEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "progress":
            self._show_progress(event.progress)
        elif kind == "state_change":
            self._show_state(event)
        elif kind == "eval":
            self._say(event, eval_text(event.eval))
        elif kind == "checkpoint":
            c = event.checkpoint
            self._say(event, f"[dim]checkpoint at step {c.step} ({format_bytes(c.size_bytes)})[/]")
        elif kind == "log" and event.log.level in _LOG_LEVELS:
            self._say(event, _LOG_LEVELS[event.log.level] + escape(event.log.message))

    def _show_progress(self, p: pb.TrainingProgress) -> None:
        self._total = p.total_steps or self._total
        memory = format_bytes(p.memory.allocated_bytes) if p.HasField("memory") else "-"
        eta = format_duration(p.eta.ToTimedelta().total_seconds()) if p.HasField("eta") else "-"
        metrics = (
            f"loss {p.loss:.4f}  lr {p.learning_rate:.1e}  {p.tokens_per_second:,.0f} tok/s  ETA {eta}  mem {memory}"
        )
        self._progress.update(
            self._task, total=self._total, completed=p.step, steps=self._steps(p.step), metrics=metrics
        )

    def _show_state(self, event: pb.JobEvent) -> None:
        change = event.state_change
        state = state_name(change.current)
        self._progress.update(self._task, description=styled_state("training" if state == "running" else state))
        text = f"job {self.job_id} {styled_state(state)}"
        if change.message and change.message != state:
            text += f": {escape(change.message)}"
        if change.HasField("error"):
            text += f"\n  [red]{escape(error_text(change.error))}[/]"
        self._say(event, text)

    def _say(self, event: pb.JobEvent, text: str) -> None:
        moment = event.time.ToDatetime(tzinfo=UTC).astimezone().strftime("%H:%M:%S") if event.HasField("time") else ""
        self._progress.console.print(f"[dim]{moment}[/] {text}" if moment else text)

    def _steps(self, step: int) -> str:
        return f"step {step}/{self._total if self._total else '?'}"


@dataclass(frozen=True)
class _Ended:
    job: pb.Job


@dataclass(frozen=True)
class _Failed:
    error: BaseException


def follow(service: GrpcFineTuneService, job: pb.Job, events: Iterable[pb.JobEvent], console: Console) -> pb.Job:
    """Show `events` until their stream ends, then return the job as the server stores it.

    A helper thread reads the stream (and then the job) and hands each item over through a queue, so a Ctrl-C lands
    in this thread's wait on that queue, never inside gRPC's own code: a KeyboardInterrupt raised between a
    `threading.Condition`'s acquire and its `with` block leaves the call's lock held, and the process then cannot
    close its channel and exit. Errors of the stream are raised here, as if it had been read here.
    """
    handoff: queue.SimpleQueue[pb.JobEvent | _Ended | _Failed] = queue.SimpleQueue()

    def read() -> None:
        try:
            for event in events:
                handoff.put(event)
            handoff.put(_Ended(service.get_job(job.id)))
        except BaseException as exc:  # every failure is the caller's to see, in the caller's thread
            handoff.put(_Failed(exc))

    threading.Thread(target=read, name=f"follow-{job.id}", daemon=True).start()
    with JobDisplay(console, job) as display:
        while True:
            try:
                item = handoff.get(timeout=SIGNAL_CHECK_S)  # a SIGINT raises KeyboardInterrupt here, no lock held
            except queue.Empty:
                continue
            if isinstance(item, _Ended):
                return item.job
            if isinstance(item, _Failed):
                raise item.error
            display.apply(item)


def follow_until_end(
    service: GrpcFineTuneService,
    job: pb.Job,
    events: Iterable[pb.JobEvent],
    console: Console,
    *,
    intro: str,
    server_flag: str = "",
) -> int:
    """`train` and `watch`: the live display until the job ends, then how it ended; returns the exit code.

    Ctrl-C detaches (the job keeps running) with the command that re-attaches, and returns 130. Everything after the
    job exists runs inside the `try`, so a Ctrl-C at any moment gets that note rather than a bare exit.
    """
    try:
        console.print(intro, soft_wrap=True)
        final = follow(service, job, events, console)
    except KeyboardInterrupt:
        console.print(
            f"\ndetached from job {job.id}; it keeps running. Re-attach with: "
            f"[bold]finetune watch {job.id}{server_flag}[/]",
            soft_wrap=True,
        )
        return EXIT_INTERRUPTED
    return report_end(console, final, server_flag=server_flag)


def report_end(console: Console, job: pb.Job, *, server_flag: str = "") -> int:
    """Say how the job ended; the exit code: 0 succeeded, 1 failed, cancelled, or not ended (the stream was cut)."""
    state = state_name(job.state)
    if job.state == pb.JOB_STATE_SUCCEEDED:
        r = job.result
        text = (
            f"[bold green]✓ job {job.id} succeeded[/]: {r.steps} steps, final loss {r.final_train_loss:.4f}"
            + (f", eval loss {r.final_eval_loss:.4f}" if r.HasField("final_eval_loss") else "")
            + f", {r.trained_tokens:,} tokens in {format_duration(r.train_runtime.ToTimedelta().total_seconds())}"
        )
        console.print(text, soft_wrap=True)
        console.print(
            f"export it: [bold]finetune export {job.id}{server_flag} --format adapter --output ./{job.id}-adapter[/]",
            soft_wrap=True,
        )
        return EXIT_OK
    if job.state == pb.JOB_STATE_FAILED:
        console.print(f"[bold red]✗ job {job.id} failed[/]: {escape(error_text(job.error))}")
        return EXIT_FAILED
    if job.state == pb.JOB_STATE_CANCELLED:
        console.print(f"[bold magenta]job {job.id} was cancelled[/] at step {job.progress.step}")
        return EXIT_FAILED
    console.print(
        f"[yellow]the event stream ended while job {job.id} is {state}[/]; "
        f"re-attach with [bold]finetune watch {job.id}{server_flag}[/]",
        soft_wrap=True,
    )
    return EXIT_FAILED


def eval_text(e: pb.EvalResult) -> str:
    """`eval at step 20: loss 0.1234, perplexity 1.13, exact match 75%, token accuracy 90%, probes 3/4 exact`
    (the parts it has: no loss without an eval set; probes without expected answers are only counted)."""
    parts = []
    if math.isfinite(e.eval_loss):
        parts.append(f"loss {e.eval_loss:.4f}, perplexity {e.perplexity:.2f}")
    if "exact_match" in e.metrics:
        parts.append(f"exact match {e.metrics['exact_match']:.0%}, token accuracy {e.metrics['token_accuracy']:.0%}")
    if e.probes:
        scored = [p for p in e.probes if p.expected]
        exact = sum(p.exact_match for p in scored)
        parts.append(f"probes {exact}/{len(scored)} exact" if scored else f"{len(e.probes)} probes answered")
    when = "before training" if e.step == 0 else f"at step {e.step}"
    best = " [green](best so far)[/]" if e.is_best else ""
    return f"eval {when}: {', '.join(parts)}{best}"
