"""Data formats: turning one JSON object into an Example (a conversation, or plain text).

Supported (see TrainingConfig.data_format):
- `alpaca`: instruction, optional input, output, optional system -> [system], user, assistant.
- `messages`: OpenAI `messages: [{role, content}]` (system/user/assistant, multi-turn; content may also be a list of
  `{"type": "text", "text": ...}` parts), or ShareGPT `conversations: [{from, value}]` (human/gpt/system) with an
  optional top-level `system`.
- `qa`: question, optional context, answer -> user (context, blank line, question), assistant.
- `text`: `text`, trained on as a whole.
`auto` picks the format of each record from its keys. Every problem is a RecordError with an UPPER_SNAKE reason and a
message naming the key, so a dataset check can point at the exact line and key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune_server.training.data.records import json_type_name

ALPACA = "alpaca"
MESSAGES = "messages"
QA = "qa"
TEXT = "text"
AUTO = "auto"
FORMATS = (ALPACA, MESSAGES, QA, TEXT)

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}


class RecordError(ValueError):
    """A record that cannot be trained on; `reason` is UPPER_SNAKE, `message` names the key and the format."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One training example: a conversation (`messages`) or plain text (`text`), and the format it was read as."""

    format: str
    messages: tuple[Message, ...] = field(default_factory=tuple)
    text: str | None = None

    @property
    def is_conversation(self) -> bool:
        return self.text is None

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


def detect_format(value: dict[str, Any]) -> str | None:
    """The format a record's keys point to, or None; the first match in this order wins."""
    if "messages" in value or "conversations" in value:
        return MESSAGES
    if "instruction" in value:
        return ALPACA
    if "question" in value:
        return QA
    if "text" in value:
        return TEXT
    return None


def _string(value: dict[str, Any], key: str, fmt: str, *, required: bool = True, label: str | None = None) -> str:
    """The string at `key`; missing/null is MISSING_FIELD when required (else ''), anything else WRONG_TYPE."""
    name = label or f"'{key}'"
    item = value.get(key)
    if item is None:
        if required:
            raise RecordError("MISSING_FIELD", f"missing key {name} ({fmt})")
        return ""
    if not isinstance(item, str):
        raise RecordError("WRONG_TYPE", f"key {name} must be a string, got {json_type_name(item)} ({fmt})")
    return item


def _non_empty(value: dict[str, Any], key: str, fmt: str, label: str | None = None) -> str:
    text = _string(value, key, fmt, label=label)
    if not text.strip():
        raise RecordError("EMPTY_CONTENT", f"key {label or repr(key)} is empty ({fmt})")
    return text


def _parse_alpaca(value: dict[str, Any]) -> Example:
    instruction = _non_empty(value, "instruction", ALPACA)
    extra = _string(value, "input", ALPACA, required=False)
    output = _non_empty(value, "output", ALPACA)
    system = _string(value, "system", ALPACA, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    turns = [Message("user", prompt), Message("assistant", output)]
    if system.strip():
        turns.insert(0, Message("system", system))
    return Example(ALPACA, tuple(turns))


def _parse_qa(value: dict[str, Any]) -> Example:
    question = _non_empty(value, "question", QA)
    context = _string(value, "context", QA, required=False)
    answer = _non_empty(value, "answer", QA)
    prompt = f"{context}\n\n{question}" if context.strip() else question
    return Example(QA, (Message("user", prompt), Message("assistant", answer)))


def _parse_text(value: dict[str, Any]) -> Example:
    return Example(TEXT, text=_non_empty(value, "text", TEXT))


def _content(item: dict[str, Any], key: str, label: str) -> str:
    """Message content: a string, or OpenAI-style text parts joined together."""
    content = item.get(key)
    if isinstance(content, list):
        pieces = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RecordError("WRONG_TYPE", f"key {label} may only hold text parts ({MESSAGES})")
            pieces.append(part["text"])
        content = "".join(pieces)
    if content is None:
        raise RecordError("MISSING_FIELD", f"missing key {label} ({MESSAGES})")
    if not isinstance(content, str):
        raise RecordError("WRONG_TYPE", f"key {label} must be a string, got {json_type_name(content)} ({MESSAGES})")
    if not content.strip():
        raise RecordError("EMPTY_CONTENT", f"key {label} is empty ({MESSAGES})")
    return content


def _parse_messages(value: dict[str, Any]) -> Example:
    sharegpt = "messages" not in value
    key, role_key, content_key = ("conversations", "from", "value") if sharegpt else ("messages", "role", "content")
    items = value.get(key)
    if items is None:
        raise RecordError("MISSING_FIELD", f"missing key '{key}' ({MESSAGES})")
    if not isinstance(items, list):
        raise RecordError("WRONG_TYPE", f"key '{key}' must be an array, got {json_type_name(items)} ({MESSAGES})")
    if not items:
        raise RecordError("EMPTY_CONTENT", f"key '{key}' is empty ({MESSAGES})")
    turns: list[Message] = []
    for index, item in enumerate(items):
        where = f"'{key}[{index}]'"
        if not isinstance(item, dict):
            raise RecordError("WRONG_TYPE", f"key {where} must be an object, got {json_type_name(item)} ({MESSAGES})")
        role = _string(item, role_key, MESSAGES, label=f"'{key}[{index}].{role_key}'")
        mapped = _SHAREGPT_ROLES.get(role) if sharegpt else (role if role in ROLES else None)
        if mapped is None:
            known = ", ".join(sorted(_SHAREGPT_ROLES) if sharegpt else ROLES)
            raise RecordError("UNKNOWN_ROLE", f"key '{key}[{index}].{role_key}' is '{role}', not one of {known}")
        turns.append(Message(mapped, _content(item, content_key, f"'{key}[{index}].{content_key}'")))
    if not any(turn.role == "assistant" for turn in turns):
        raise RecordError("NO_ASSISTANT_TURN", f"key '{key}' has no assistant turn to learn from ({MESSAGES})")
    system = _string(value, "system", MESSAGES, required=False)
    if system.strip() and turns[0].role != "system":
        turns.insert(0, Message("system", system))
    return Example(MESSAGES, tuple(turns))


_PARSERS = {ALPACA: _parse_alpaca, MESSAGES: _parse_messages, QA: _parse_qa, TEXT: _parse_text}
_KEYS = {ALPACA: "instruction/output", MESSAGES: "messages or conversations", QA: "question/answer", TEXT: "text"}


def parse_record(value: Any, data_format: str = AUTO) -> Example:
    """Read one record as `data_format` (or as the format its keys suggest, for `auto`)."""
    if not isinstance(value, dict):
        raise RecordError("WRONG_TYPE", f"expected a JSON object, got {json_type_name(value)}")
    detected = detect_format(value)
    if data_format == AUTO:
        if detected is None:
            expected = "; ".join(f"{keys} ({fmt})" for fmt, keys in _KEYS.items())
            raise RecordError("UNKNOWN_FORMAT", f"no known keys; expected one of: {expected}")
        return _PARSERS[detected](value)
    parser = _PARSERS.get(data_format)
    if parser is None:
        raise RecordError("UNKNOWN_FORMAT", f"unknown data format '{data_format}'; use auto or one of {FORMATS}")
    if detected is not None and detected != data_format and not _has_keys_of(value, data_format):
        raise RecordError(
            "FORMAT_MISMATCH",
            f"record looks like {detected} ({_KEYS[detected]}) but data_format is {data_format} "
            f"(expects {_KEYS[data_format]})",
        )
    return parser(value)


# The columns a table needs for each format (any one of a tuple's alternatives).
_REQUIRED_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    ALPACA: (("instruction",), ("output",)),
    MESSAGES: (("messages", "conversations"),),
    QA: (("question",), ("answer",)),
    TEXT: (("text",),),
}


def column_layout_problem(columns: list[str], data_format: str = AUTO) -> str | None:
    """Why a table with these columns cannot be read as `data_format` (for `auto`: as any format), or None.

    Every row of a table has the same keys, so a layout no format matches is one problem, not one per row.
    """
    present = set(columns)
    fmt = detect_format(dict.fromkeys(present)) if data_format == AUTO else data_format
    named = ", ".join(repr(c) for c in columns) or "none"
    if fmt is None:
        expected = "; ".join(f"{keys} ({name})" for name, keys in _KEYS.items())
        return f"the columns ({named}) match no data format; expected one of: {expected}"
    required = _REQUIRED_COLUMNS.get(fmt)
    if required is None:
        return None  # an unknown data_format: each row reports it
    missing = [" or ".join(repr(c) for c in options) for options in required if not present & set(options)]
    if missing:
        return f"the columns ({named}) lack {', '.join(missing)}, which {fmt} needs (it reads {_KEYS[fmt]})"
    return None


def _has_keys_of(value: dict[str, Any], data_format: str) -> bool:
    if data_format == MESSAGES:
        return "messages" in value or "conversations" in value
    first = {ALPACA: "instruction", QA: "question", TEXT: "text"}[data_format]
    return first in value
