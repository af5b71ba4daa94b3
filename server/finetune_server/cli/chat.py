"""`finetune chat`: talk to a job's model in the terminal, streamed, optionally beside its base model.

Each line read is a user turn; the answer streams as the server generates it. With --compare-base the base model
answers first, then the tuned one, each labelled and each keeping its own side of the conversation. EOF or `/exit`
ends the chat.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from finetune_client import GrpcFineTuneService
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb

EXIT_WORDS = frozenset({"/exit", "/quit"})


@dataclass
class Speaker:
    """One model in the chat: how it is named to the server, its label, and its side of the conversation."""

    label: str
    target: dict[str, Any]
    history: list[dict[str, str]] = field(default_factory=list)


def speakers(job: pb.Job, checkpoint_step: int | None, compare_base: bool, system: str) -> list[Speaker]:
    step = f" step {checkpoint_step}" if checkpoint_step is not None else ""
    tuned = Speaker(f"tuned ({job.id}{step})", {"job_id": job.id, "checkpoint_step": checkpoint_step})
    chosen = [Speaker(f"base ({job.config.model_name})", {"model_name": job.config.model_name})] if compare_base else []
    chosen.append(tuned)
    for speaker in chosen:
        if system:
            speaker.history.append({"role": "system", "content": system})
    return chosen


def run_chat(
    service: GrpcFineTuneService,
    chosen: list[Speaker],
    lines: Iterable[str],
    out: Console,
    *,
    prompt: bool,
    max_new_tokens: int | None,
    temperature: float,
) -> None:
    """Answer each line read until EOF or /exit; every answer streams to `out` as it arrives."""
    if prompt:
        out.print("[dim]type a message; /exit or Ctrl-D ends the chat[/]")
    for line in _read(lines, out, prompt):
        text = line.strip()
        if text in EXIT_WORDS:
            return
        if not text:
            continue
        for speaker in chosen:
            speaker.history.append({"role": "user", "content": text})
            out.print(f"[bold cyan]{speaker.label}>[/] ", end="")
            pieces = []
            with service.generate(
                speaker.history, max_new_tokens=max_new_tokens, temperature=temperature, **speaker.target
            ) as stream:
                for piece in stream:
                    pieces.append(piece)
                    out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
            out.print(_finish_note(stream.finish))
            speaker.history.append({"role": "assistant", "content": "".join(pieces)})


def _finish_note(finish: pb.GenerateFinish | None) -> str:
    """Nothing when the model ended its turn; else why the answer stopped (max tokens, a stop string, ...)."""
    if finish is not None and finish.reason == pb.FINISH_REASON_EOS:
        return ""
    reason = pb.FinishReason.Name(finish.reason) if finish is not None else "FINISH_REASON_UNSPECIFIED"
    return f" [dim]({reason.removeprefix('FINISH_REASON_').lower().replace('_', ' ')})[/]"


def _read(lines: Iterable[str], out: Console, prompt: bool) -> Iterable[str]:
    iterator = iter(lines)
    while True:
        if prompt:
            out.print("[bold green]you>[/] ", end="")
        line = next(iterator, None)
        if line is None:
            return
        yield line
