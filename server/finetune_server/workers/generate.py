"""The generation worker: one model (a base, a job's adapter or checkpoint, an artifact) loaded once, answering chat
requests one at a time and streaming the text over a pipe (`protocol.py`).

Started as ``python -m finetune_server.workers.generate --spec SPEC.json --events-fd N``; SPEC.json is
`GenerateSpec`. It sends ``ready`` once the model is loaded, then reads requests from stdin, one JSON line each
(`GenerateCommand`); ``cancel`` stops the generation in progress at its next token; EOF ends the worker when the
current generation is done. The server half is `supervisor.run_generate`, driven by `jobs/generation.py`.

The prompt is rendered with the template the adapter was trained with (the same renderer and tokenizer as training,
`training/data`), and generation stops at the ids an export writes into its generation_config.json (the tokenizer's
EOS, the template's end of turn, the base's EOS). The model's own generation_config.json adds nothing else (no
repetition penalty, top-k or default temperature): greedy is the argmax, sampling is exactly temperature and top_p.
This module never imports torch at module level (the server imports it for `GenerateSpec` and `GenerateCommand`).
"""

from __future__ import annotations

import functools
import json
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import structlog

from finetune_server.errors import ErrorKind, FinetuneError, field_error
from finetune_server.host.cpu_policy import apply_in_worker
from finetune_server.workers.protocol import (
    EXIT_CRASH,
    EXIT_ERROR,
    EXIT_OK,
    Channel,
    Error,
    GenerateDone,
    GeneratedText,
    GenerateReady,
    GenerateRefused,
    Spec,
    exit_process,
    parse_worker_args,
)

log = structlog.get_logger(__name__)

WORKER_MODULE = "finetune_server.workers.generate"  # what the server starts with `python -m`
CANCEL_LINE = "cancel"


@dataclass(frozen=True)
class GenerateSpec(Spec):
    """What one generation worker loads; JSON-able. Two requests may share a worker when their specs are equal."""

    model_ref: str  # the base model (its load ref), or a MERGED artifact's folder
    job_id: str | None = None  # for the logs
    job_dir: str | None = None  # a job's adapter: its final one, or the checkpoint of checkpoint_step
    checkpoint_step: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the job's resolved config (its template settings)
    artifact_dir: str | None = None  # an exported artifact: its tokenizer and template (and adapter, when ADAPTER)
    artifact_step: int = 0
    hub_cache_dir: str | None = None
    hub_offline: bool | None = None
    device: str | None = None  # None: the first CUDA device when there is one, else the CPU
    cpu_threads: int | None = None
    cpus: list[int] | None = None

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class GenerateCommand:
    """One request on the worker's stdin: the conversation and how to sample (checked by the server)."""

    messages: list[dict[str, str]]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def line(self) -> bytes:
        return (json.dumps(asdict(self), separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_line(cls, line: str) -> Self:
        return cls(**json.loads(line))


# --- what is loaded --------------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    model: Any
    tokenizer: Any  # training/data/tokenizer.TextTokenizer: the tokens training saw
    template: str
    eos_ids: list[int]
    pad_id: int | None
    context_length: int  # 0: unknown
    step: int


def _template_of(folder: Path) -> str:
    from finetune_server.training.data.template import TemplateError, choose_chat_template

    try:
        return choose_chat_template(folder)[0]
    except TemplateError as exc:
        raise FinetuneError(ErrorKind.FAILED_PRECONDITION, "NO_CHAT_TEMPLATE", str(exc)) from exc


def load(spec: GenerateSpec) -> Loaded:
    """The model (with its adapter, when there is one) in eval mode, its tokenizer, template and stop ids."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from finetune_server.export.package import (
        find_adapter,
        merge_dtype,
        stop_ids,
        tokenizer_source,
    )
    from finetune_server.storage import layout
    from finetune_server.training.data.tokenizer import load_tokenizer
    from finetune_server.training.model_source import resolve_model_dir
    from finetune_server.util.json_values import read_json_object

    def base_dir() -> Path:
        cache = Path(spec.hub_cache_dir) if spec.hub_cache_dir else None
        return resolve_model_dir(spec.model_ref, cache_dir=cache, offline=spec.hub_offline)

    adapter_dir: Path | None = None
    step = spec.artifact_step
    if spec.artifact_dir is not None:
        tokenizer_dir = Path(spec.artifact_dir)
        template = _template_of(tokenizer_dir)
        adapter_dir = tokenizer_dir if layout.has_adapter(tokenizer_dir) else None
    elif spec.job_dir is not None:
        adapter_dir, step = find_adapter(Path(spec.job_dir), spec.checkpoint_step)
        tokenizer_dir, template = tokenizer_source(Path(spec.job_dir), spec.config, base_dir)
    else:
        tokenizer_dir = base_dir()
        template = _template_of(tokenizer_dir)
        step = 0
    model_dir = base_dir()
    eos_ids, pad_id = stop_ids(model_dir, tokenizer_dir, template)

    device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log.info("loading model", model=spec.model_ref, adapter=str(adapter_dir), device=str(device))
    # fp32 on the CPU (exact, and bf16 there is slow); on a GPU the base's own dtype, as a merged export ships it.
    dtype = getattr(torch, merge_dtype(read_json_object(model_dir / "config.json")), "auto")
    if device.type != "cuda":
        dtype = torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    model.eval()
    # Only what stops generation: nothing of the model's generation_config.json (penalties, top-k) slips in.
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    return Loaded(model, load_tokenizer(tokenizer_dir), template, eos_ids, pad_id, context, step)


# --- one generation --------------------------------------------------------------------------------------------------


class _Answer:
    """The generated ids decoded into text pieces: stop strings cut the answer, a piece never ends mid-character,
    and text that may be the start of a stop string is held back until it is known not to be."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], send: Callable[[str], None]) -> None:
        self._tokenizer = tokenizer
        self._stop = list(stop)
        self._send = send
        self.ids: list[int] = []
        self._sent = 0  # characters of the decoded text sent so far
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> None:
        self.ids += token_ids
        text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        found = [at for at in (text.find(s) for s in self._stop) if at >= 0]
        if found:
            self.stopped = True
            self._flush(text[: min(found)])
            return
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return
        hold = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._flush(text[: len(text) - hold])

    def finish(self) -> None:
        if not self.stopped:
            self._flush(self._tokenizer.decode(self.ids, skip_special_tokens=True))

    def _flush(self, text: str) -> None:
        if len(text) > self._sent:
            self._send(text[self._sent :])
            self._sent = len(text)


def _prompt_ids(loaded: Loaded, command: GenerateCommand) -> list[int]:
    from finetune_server.training.data.encode import encode_prompt
    from finetune_server.training.data.template import TemplateError

    try:  # exactly as the job's behaviour evaluation prompts it
        ids = encode_prompt(command.messages, loaded.tokenizer, loaded.template)
    except TemplateError as exc:
        raise field_error(ErrorKind.INVALID_ARGUMENT, "TEMPLATE_FAILED", "messages", str(exc)) from exc
    if loaded.context_length and len(ids) + command.max_new_tokens > loaded.context_length:
        raise field_error(
            ErrorKind.INVALID_ARGUMENT,
            "PROMPT_TOO_LONG",
            "messages",
            f"the prompt is {len(ids)} tokens; with max_new_tokens {command.max_new_tokens} that is more than the "
            f"model's context of {loaded.context_length} tokens",
            hint="Send fewer or shorter messages, or a smaller max_new_tokens.",
        )
    return ids


def generate(
    loaded: Loaded, command: GenerateCommand, should_stop: Callable[[], bool], send: Callable[[str], None]
) -> GenerateDone:
    """Answer one request, sending text pieces as they are decoded; ends at EOS, max tokens, a stop string or when
    `should_stop()` (asked after every token)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    ids = _prompt_ids(loaded, command)
    answer = _Answer(loaded.tokenizer, command.stop, send)

    class Streamer(BaseStreamer):
        prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # generate() first puts the prompt
                self.prompt_seen = True
                return
            answer.add([int(i) for i in value.reshape(-1).tolist()])

        def end(self) -> None:
            pass

    class Halt(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            done = should_stop() or answer.stopped
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    sampling: dict[str, Any] = {"do_sample": False}
    if command.temperature > 0:
        sampling = {"do_sample": True, "temperature": command.temperature, "top_p": command.top_p, "top_k": 0}
        if command.seed is not None:
            torch.manual_seed(command.seed)
    device = next(loaded.model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    with torch.inference_mode():
        loaded.model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=command.max_new_tokens,
            streamer=Streamer(),
            stopping_criteria=StoppingCriteriaList([Halt()]),
            **sampling,
        )
    answer.finish()
    produced = answer.ids
    if answer.stopped:
        reason = "stop"
    elif produced and produced[-1] in loaded.eos_ids:
        reason = "eos"
    elif should_stop():
        reason = "cancelled"
    else:
        reason = "max_tokens"
    return GenerateDone(finish_reason=reason, prompt_tokens=len(ids), completion_tokens=len(produced))


# --- the worker's loop -----------------------------------------------------------------------------------------------


class Cancels:
    """Which requests were cancelled: a ``cancel`` line is for the latest request read before it, so one that
    arrives after its request finished never stops the next; EOF cancels everything."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read = 0
        self._cancelled = 0
        self._closed = False

    def read(self) -> int:
        with self._lock:
            self._read += 1
            return self._read

    def cancel(self, everything: bool = False) -> None:
        with self._lock:
            self._cancelled = self._read
            self._closed = self._closed or everything

    def cancelled(self, number: int) -> bool:
        with self._lock:
            return self._closed or self._cancelled >= number


Requests = queue.Queue[tuple[int, GenerateCommand] | None]


def read_commands(stdin: IO[str], requests: Requests, cancels: Cancels) -> None:
    """stdin, in a thread: requests queue up numbered, ``cancel`` stops the latest, EOF stops all and ends."""
    try:
        for raw in stdin:
            line = raw.strip()
            if line == CANCEL_LINE:
                cancels.cancel()
            elif line:
                try:
                    command = GenerateCommand.from_line(line)
                except (TypeError, ValueError):
                    log.warning("bad request line dropped", line=line[:200])
                    continue
                requests.put((cancels.read(), command))
    except (OSError, ValueError):
        pass
    cancels.cancel(everything=True)  # the server went (or closed stdin): stop what runs, then exit
    requests.put(None)


def serve(loaded: Loaded, channel: Channel, requests: Requests, cancels: Cancels) -> None:
    channel.send(GenerateReady(context_length=loaded.context_length, step=loaded.step))
    while (item := requests.get()) is not None:
        number, command = item
        try:
            done = generate(
                loaded,
                command,
                functools.partial(cancels.cancelled, number),
                lambda text: channel.send(GeneratedText(text=text)),
            )
        except FinetuneError as exc:
            channel.send(GenerateRefused.from_exception(exc))
            continue
        log.info("generated", finish_reason=done.finish_reason, completion_tokens=done.completion_tokens)
        channel.send(done)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_worker_args(WORKER_MODULE, "Answer chat requests with one model.", argv)
    channel = Channel.open(args.events_fd, threading.Event())
    requests: Requests = queue.Queue()
    cancels = Cancels()
    threading.Thread(target=read_commands, args=(sys.stdin, requests, cancels), name="stdin", daemon=True).start()
    try:
        spec = GenerateSpec.read(args.spec)
        apply_in_worker(spec.cpu_threads, spec.cpus)  # before load() imports torch
        serve(load(spec), channel, requests, cancels)
        code = EXIT_OK
    except FinetuneError as exc:  # the model, adapter or checkpoint could not be loaded
        log.warning("generation worker failed", reason=exc.reason, error=exc.message)
        channel.send(Error.from_exception(exc))
        code = EXIT_ERROR
    except Exception:
        log.exception("generation worker crashed")
        code = EXIT_CRASH
    channel.close()
    return code


if __name__ == "__main__":
    exit_process(main())
