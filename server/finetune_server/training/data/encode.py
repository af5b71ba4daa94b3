"""Turning an Example into input ids and labels: the model's chat template, loss on the answers, EOS guaranteed.

Conversations are rendered with the chat template exactly as serving renders them. Which characters belong to each
assistant turn is found by rendering prefixes: `messages[:i]` with the generation prompt ends where turn `i` starts,
and `messages[:i+1]` ends where it ends. That works for any template, with no `{% generation %}` markers needed.
Character spans map to tokens through the tokenizer's offsets.

Labels cover each assistant turn's content and its end: the template's tokens after the content up to and including
the first end-of-generation token (eos, or any of generation_config's eos ids, such as ChatML's `<|im_end|>`); what
follows (`\\n`, the next header) is masked. When the template emits no such token inside the turn, the tokenizer's
eos is inserted right after the content, so a trained model always learns to stop. Plain text is BOS (when the
tokenizer adds one) + text + EOS, all trained. Examples longer than max_length keep their start.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_server.training.data.formats import Example, Message
from finetune_server.training.data.template import TemplateError, render
from finetune_server.training.data.tokenizer import TextTokenizer

IGNORE_INDEX = -100


@dataclass(frozen=True)
class AssistantSpan:
    """One assistant turn in the rendered text: characters [start, end), its content ending at content_end."""

    start: int
    content_end: int
    end: int


@dataclass(frozen=True)
class RenderedExample:
    """The text to tokenize and which parts of it to train on; `plain` marks a text example (all trained)."""

    text: str
    spans: tuple[AssistantSpan, ...] = ()
    plain: bool = False


@dataclass
class EncodedExample:
    """Token ids and labels (IGNORE_INDEX where masked), after truncation.

    `num_tokens` is the length before truncation (what TokenStats count); `len(input_ids)` the length trained on.
    `num_trainable` counts the kept labelled tokens: 0 means truncation cut every answer token.
    """

    input_ids: list[int]
    labels: list[int]
    num_tokens: int
    truncated: bool
    num_trainable: int


def _content_end(text: str, content: str, start: int, end: int) -> int:
    """Where the message content ends inside [start, end); templates may trim it, so look for the stripped form."""
    stripped = content.strip()
    found = text.rfind(stripped, start, end) if stripped else -1
    return found + len(stripped) if found >= 0 else end


def _spans_by_prefix(
    template: str, messages: Sequence[Message], full: str, variables: dict[str, str]
) -> list[AssistantSpan] | None:
    spans = []
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = render(template, messages[:index], add_generation_prompt=True, **variables)
        last = index == len(messages) - 1
        turn = full if last else render(template, messages[: index + 1], add_generation_prompt=False, **variables)
        if not (full.startswith(turn) and turn.startswith(prompt)):
            return None
        start, end = len(prompt), len(turn)
        spans.append(AssistantSpan(start, _content_end(full, message.content, start, end), end))
    return spans


def _spans_by_search(messages: Sequence[Message], full: str) -> list[AssistantSpan]:
    """Fallback for templates whose prefixes are not stable (e.g. ones that rewrite earlier turns): find each
    message's content in order; an assistant turn runs from its content to the next message's content."""
    found: list[tuple[Message, int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        stripped = message.content.strip()
        position = full.find(stripped, cursor)
        if position < 0:
            if message.role == "assistant":
                raise TemplateError(f"the chat template does not render assistant turn {index} verbatim")
            continue  # some templates drop or rewrite system messages
        cursor = position + len(stripped)
        found.append((message, position, cursor))
    spans = []
    for k, (message, position, content_end) in enumerate(found):
        if message.role == "assistant":
            end = found[k + 1][1] if k + 1 < len(found) else len(full)
            spans.append(AssistantSpan(position, content_end, end))
    return spans


def render_example(example: Example, tokenizer: TextTokenizer, template: str) -> RenderedExample:
    """Render a conversation with the template and locate its assistant turns; TemplateError if it cannot."""
    if not example.is_conversation:
        return RenderedExample(example.text or "", plain=True)
    variables = tokenizer.template_variables
    messages = example.messages
    full = render(template, messages, add_generation_prompt=False, **variables)
    spans = _spans_by_prefix(template, messages, full, variables)
    if spans is None:
        spans = _spans_by_search(messages, full)
    return RenderedExample(full, tuple(spans))


def encode_prompt(
    messages: Sequence[Message | Mapping[str, Any]], tokenizer: TextTokenizer, template: str
) -> list[int]:
    """The ids a model answers `messages` from: rendered with the generation prompt, tokenized as training does.
    Raises TemplateError when the template cannot render them."""
    prompt = render(template, messages, add_generation_prompt=True, **tokenizer.template_variables)
    return tokenizer.encode(prompt)


def _label(
    rendered: RenderedExample,
    ids: list[int],
    offsets: Sequence[tuple[int, int]],
    tokenizer: TextTokenizer,
    train_on_prompt: bool,
) -> tuple[list[int], list[int]]:
    """Labels for the tokens of a rendered conversation, with eos inserted where a turn lacks one."""
    eos_id = tokenizer.eos_token_id
    if rendered.plain:
        full = ([tokenizer.bos_token_id] if tokenizer.add_bos and tokenizer.bos_token_id is not None else []) + ids
        if eos_id is not None:
            full.append(eos_id)
        return full, list(full)
    starts, ends = zip(*offsets, strict=True) if offsets else ((), ())
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
    inserts: list[int] = []  # token indices before which an eos is inserted
    stop_ids = tokenizer.eos_token_ids
    for span in rendered.spans:
        first = bisect_right(ends, span.start)  # first token ending after the turn starts
        after_content = bisect_left(starts, span.content_end)
        limit = bisect_left(starts, span.end)
        stop = next((j for j in range(after_content, limit) if ids[j] in stop_ids), None)
        last = stop + 1 if stop is not None else after_content
        if not train_on_prompt:
            labels[first:last] = ids[first:last]
        if stop is None and eos_id is not None:
            inserts.append(after_content)
    if not inserts:
        return ids, labels
    out_ids: list[int] = []
    out_labels: list[int] = []
    previous = 0
    for position in inserts:
        out_ids += ids[previous:position]
        out_labels += labels[previous:position]
        out_ids.append(eos_id)  # type: ignore[arg-type]  # inserts is empty when eos_id is None
        out_labels.append(eos_id)  # type: ignore[arg-type]
        previous = position
    out_ids += ids[previous:]
    out_labels += labels[previous:]
    return out_ids, out_labels


def _finish(input_ids: list[int], labels: list[int], max_length: int) -> EncodedExample:
    total = len(input_ids)
    if total > max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    trainable = len(labels) - labels.count(IGNORE_INDEX)
    return EncodedExample(input_ids, labels, total, total > max_length, trainable)


def encode_rendered(
    rendered: Sequence[RenderedExample],
    tokenizer: TextTokenizer,
    *,
    max_length: int,
    train_on_prompt: bool = False,
) -> list[EncodedExample]:
    """Tokenize already rendered examples in one batch and label them."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    encodings = tokenizer.encode_batch([item.text for item in rendered])
    results = []
    for item, (ids, offsets) in zip(rendered, encodings, strict=True):
        input_ids, labels = _label(item, ids, offsets, tokenizer, train_on_prompt)
        results.append(_finish(input_ids, labels, max_length))
    return results


def encode_example(
    example: Example,
    tokenizer: TextTokenizer,
    template: str,
    *,
    max_length: int,
    train_on_prompt: bool = False,
) -> EncodedExample:
    """One example to ids and labels; raises TemplateError when the template cannot render it."""
    rendered = render_example(example, tokenizer, template)
    return encode_rendered([rendered], tokenizer, max_length=max_length, train_on_prompt=train_on_prompt)[0]


def encode_many(
    examples: Sequence[Example],
    tokenizer: TextTokenizer,
    template: str,
    *,
    max_length: int,
    train_on_prompt: bool = False,
) -> list[EncodedExample]:
    """encode_example for a batch, tokenized together (several times faster than one by one)."""
    rendered = [render_example(example, tokenizer, template) for example in examples]
    return encode_rendered(rendered, tokenizer, max_length=max_length, train_on_prompt=train_on_prompt)
