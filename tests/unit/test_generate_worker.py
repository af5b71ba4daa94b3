"""The generation worker's pieces that need no model: text pieces cut at stop strings and never mid-character,
cancels that reach only the request they were meant for, and a server side that never imports torch."""

from __future__ import annotations

import io
import queue
import subprocess
import sys
from pathlib import Path

from finetune_server.training.data.tokenizer import load_tokenizer
from finetune_server.workers.generate import Cancels, GenerateCommand, Requests, _Answer, read_commands


def pieces_of(tiny_model_dir: Path, text: str, stop: list[str]) -> tuple[list[str], bool]:
    tokenizer = load_tokenizer(tiny_model_dir)
    sent: list[str] = []
    answer = _Answer(tokenizer, stop, sent.append)
    for token in tokenizer.encode(text):  # one token at a time, as generate() streams them
        answer.add([token])
        if answer.stopped:
            break
    answer.finish()
    return sent, answer.stopped


def test_pieces_add_up_to_the_text_and_stop_before_a_stop_string(tiny_model_dir: Path) -> None:
    text = "The code is H254. Next question"
    sent, stopped = pieces_of(tiny_model_dir, text, [])
    assert "".join(sent) == text and len(sent) > 1 and not stopped
    sent, stopped = pieces_of(tiny_model_dir, text, [". Next", "never"])
    assert "".join(sent) == "The code is H254" and stopped
    assert not any("." in piece for piece in sent), "the start of a stop string was held back, never sent"


def test_pieces_never_end_inside_a_character(tiny_model_dir: Path) -> None:
    sent, _ = pieces_of(tiny_model_dir, "Zürich → Genève ✓", [])
    assert "".join(sent) == "Zürich → Genève ✓" and not any("\ufffd" in piece for piece in sent)


def test_a_cancel_stops_the_request_read_before_it_and_no_later_one() -> None:
    line = GenerateCommand(messages=[{"role": "user", "content": "hi"}], max_new_tokens=4).line().decode()
    requests: Requests = queue.Queue()
    cancels = Cancels()
    read_commands(io.StringIO(f"{line}cancel\n{line}"), requests, cancels)
    first, second = requests.get_nowait(), requests.get_nowait()
    assert first is not None and second is not None and requests.get_nowait() is None
    assert cancels.cancelled(first[0])
    assert cancels.cancelled(second[0]), "EOF (the server went) stops everything"
    fresh = Cancels()
    late = fresh.read()
    fresh.cancel()
    assert fresh.cancelled(late) and not fresh.cancelled(fresh.read())


def test_the_server_side_of_generate_never_imports_torch() -> None:
    probe = (
        "import sys, finetune_server.app, finetune_server.jobs.generation, finetune_server.workers.generate; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"
