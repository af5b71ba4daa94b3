"""Records (JSONL/JSON reading), data formats and chat-template loading/rendering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_server.training.data.formats import Example, Message, RecordError, parse_record
from finetune_server.training.data.records import detect_file_format, iter_records
from finetune_server.training.data.template import (
    FALLBACK_CHAT_TEMPLATE,
    TemplateError,
    choose_chat_template,
    load_chat_template,
    render,
)

# ---------------------------------------------------------------------------------------------------------- records


def test_jsonl_records_are_numbered_by_line_with_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n   \n{"text": "b"}\r\n[1]\n{oops\n"s"\n{"text": "\xff"}\n')
    records = list(iter_records(path))
    assert [r.line for r in records] == [1, 4, 5, 6, 7, 8]
    assert records[0].value == {"text": "a"} and records[0].error is None
    assert records[1].value == {"text": "b"}
    assert (records[2].reason, records[2].error) == ("NOT_AN_OBJECT", "expected a JSON object, got array")
    assert records[3].reason == "INVALID_JSON" and "invalid JSON" in (records[3].error or "")
    assert records[4].reason == "NOT_AN_OBJECT" and "got string" in (records[4].error or "")
    assert records[5].reason == "INVALID_UTF8" and records[5].value is None


def test_json_array_elements_are_numbered_from_one(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, 3, {"text": "b"}], indent=2))
    records = list(iter_records(path))
    assert detect_file_format(path) == "json"
    assert [(r.line, r.value, r.reason) for r in records] == [
        (1, {"text": "a"}, None),
        (2, None, "NOT_AN_OBJECT"),
        (3, {"text": "b"}, None),
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"a": 1', [(1, "INVALID_JSON")]),  # a .json file starting with `{` is read as JSONL: its line 1 is invalid
        ('"just a string"', [(0, "NOT_AN_ARRAY")]),
        ("[1, 2", [(1, "NOT_AN_OBJECT"), (2, "NOT_AN_OBJECT"), (0, "INVALID_JSON")]),  # what came before the break
        ('[{"text": "a"} {"text": "b"}]', [(1, None), (0, "INVALID_JSON")]),
        ('[{"text": "a"},]', [(1, None), (0, "INVALID_JSON")]),
        ('[{"text": "a"}] x', [(1, None), (0, "INVALID_JSON")]),
        ("[]", []),
        ("  \n ", []),
    ],
)
def test_a_broken_json_file_ends_in_one_line_zero_record(
    tmp_path: Path, content: str, expected: list[tuple[int, str | None]]
) -> None:
    path = tmp_path / "d.json"
    path.write_text(content)
    assert [(r.line, r.reason) for r in iter_records(path)] == expected


def _mixed_elements(n: int) -> list[object]:
    texts = ["plain", "é漢😀 multi-byte", 'quote " and \\ backslash', "line\nbreak", "x" * 300]
    return [
        {"text": texts[i % len(texts)], "n": i * 1.5 if i % 2 else -(10**12) - i, "nested": {"a": [i, None, True]}}
        if i % 7
        else "not an object"
        for i in range(n)
    ]


@pytest.mark.parametrize("chunk_chars", [1, 7, 64, 1 << 20])
def test_a_json_array_is_streamed_across_chunk_boundaries_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_chars: int
) -> None:
    """Elements, numbers, escapes and multi-byte characters cut anywhere by a read come out as json.loads reads them."""
    from finetune_server.training.data import records as records_module

    monkeypatch.setattr(records_module, "_CHUNK_CHARS", chunk_chars)
    elements = _mixed_elements(60)
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(elements, indent=1, ensure_ascii=False).encode())
    got = list(iter_records(path))
    assert [r.line for r in got] == list(range(1, 61))
    assert [r.value for r in got if r.reason is None] == [e for e in elements if isinstance(e, dict)]
    assert {r.reason for r in got if r.value is None} == {"NOT_AN_OBJECT"}


def test_a_json_arrays_error_points_where_json_loads_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_server.training.data import records as records_module

    monkeypatch.setattr(records_module, "_CHUNK_CHARS", 5)
    text = json.dumps(_mixed_elements(12), indent=2)
    broken = text[: text.index('"n"', len(text) // 2)] + "oops" + text[text.index('"n"', len(text) // 2) :]
    path = tmp_path / "d.json"
    path.write_text(broken)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(broken)
    last = list(iter_records(path))[-1]
    assert (last.line, last.reason) == (0, "INVALID_JSON")
    assert f"line {expected.value.lineno} column {expected.value.colno}" in (last.error or "")


def test_a_big_json_array_is_read_in_little_memory(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "big.json"
    with path.open("w") as f:
        f.write("[" + ",".join(json.dumps({"text": f"example {i} " + "y" * 200}) for i in range(40_000)) + "]")
    size = path.stat().st_size
    tracemalloc.start()
    count = sum(1 for _ in iter_records(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 40_000
    assert peak < size / 2, f"peak {peak} bytes for a {size}-byte file: the array was held whole"


def test_absurdly_deep_json_is_an_unusable_line_not_a_crash(tmp_path: Path) -> None:
    # 5,000 levels made json.loads raise RecursionError (an INTERNAL status, found by the fuzz run); 100 levels parse
    # but would break whatever walks the value next.
    lines = tmp_path / "d.jsonl"
    lines.write_text("[" * 5000 + "]" * 5000 + "\n" + '{"text": ' * 100 + '"x"' + "}" * 100 + '\n{"text": "ok"}\n')
    assert [(r.line, r.reason) for r in iter_records(lines)] == [(1, "TOO_DEEP"), (2, "TOO_DEEP"), (3, None)]
    array = tmp_path / "d.json"
    array.write_text("[" * 5000 + "]" * 5000)
    assert [(r.line, r.reason) for r in iter_records(array)] == [(0, "TOO_DEEP")]


def test_file_format_by_extension_or_sniffing(tmp_path: Path) -> None:
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    sniffed_array = tmp_path / "data.txt"
    sniffed_array.write_text('  \n [{"text": "a"}]')
    forced = tmp_path / "data.ndjson"
    forced.write_text('[{"text": "a"}]')
    assert detect_file_format(lines) == "jsonl"
    assert [r.value for r in iter_records(lines)] == [{"text": "a"}, {"text": "b"}]
    assert detect_file_format(sniffed_array) == "json"
    assert [r.value for r in iter_records(sniffed_array)] == [{"text": "a"}]
    assert detect_file_format(forced) == "jsonl"


# ---------------------------------------------------------------------------------------------------------- formats


def _roles(example: Example) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in example.messages]


def test_alpaca_with_input_and_system() -> None:
    example = parse_record({"instruction": "Add", "input": "2 and 2", "output": "4", "system": "Be exact."})
    assert example.format == "alpaca" and example.is_conversation
    assert _roles(example) == [("system", "Be exact."), ("user", "Add\n\n2 and 2"), ("assistant", "4")]
    bare = parse_record({"instruction": "Hi", "input": "", "output": "Hello"}, "alpaca")
    assert _roles(bare) == [("user", "Hi"), ("assistant", "Hello")]


def test_openai_messages_multi_turn_with_system_and_text_parts() -> None:
    value = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U1"},
            {"role": "assistant", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "1"}]},
            {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"},
        ]
    }
    example = parse_record(value)
    assert example.format == "messages"
    assert _roles(example) == [
        ("system", "S"),
        ("user", "U1"),
        ("assistant", "A1"),
        ("user", "U2"),
        ("assistant", "A2"),
    ]


def test_sharegpt_roles_are_mapped_and_top_level_system_prepended() -> None:
    value = {
        "system": "Sys",
        "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
    }
    example = parse_record(value, "messages")
    assert _roles(example) == [("system", "Sys"), ("user", "Q"), ("assistant", "A")]


def test_qa_and_text() -> None:
    qa = parse_record({"question": "Who?", "context": "Bob went home.", "answer": "Bob"})
    assert qa.format == "qa"
    assert _roles(qa) == [("user", "Bob went home.\n\nWho?"), ("assistant", "Bob")]
    text = parse_record({"text": "Once upon a time"})
    assert text.format == "text" and not text.is_conversation and text.text == "Once upon a time"


@pytest.mark.parametrize(
    ("value", "data_format", "reason", "needle"),
    [
        ({"instruction": "x"}, "auto", "MISSING_FIELD", "missing key 'output' (alpaca)"),
        ({"instruction": "x", "output": 3}, "auto", "WRONG_TYPE", "key 'output' must be a string, got number"),
        ({"instruction": "x", "output": "  "}, "auto", "EMPTY_CONTENT", "key 'output' is empty (alpaca)"),
        ({"question": "q"}, "qa", "MISSING_FIELD", "missing key 'answer' (qa)"),
        ({"text": ""}, "text", "EMPTY_CONTENT", "key 'text' is empty"),
        ({"text": ["a"]}, "auto", "WRONG_TYPE", "key 'text' must be a string, got array"),
        ({"messages": "hi"}, "auto", "WRONG_TYPE", "key 'messages' must be an array"),
        ({"messages": []}, "auto", "EMPTY_CONTENT", "key 'messages' is empty"),
        ({"messages": ["hi"]}, "auto", "WRONG_TYPE", "key 'messages[0]' must be an object"),
        ({"messages": [{"role": "user"}]}, "auto", "MISSING_FIELD", "missing key 'messages[0].content'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "auto", "UNKNOWN_ROLE", "'messages[0].role' is 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "auto", "NO_ASSISTANT_TURN", "no assistant turn"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
            "auto",
            "EMPTY_CONTENT",
            "key 'messages[1].content' is empty",
        ),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "auto", "UNKNOWN_ROLE", "'robot'"),
        ({"prompt": "x", "completion": "y"}, "auto", "UNKNOWN_FORMAT", "no known keys"),
        ({"text": "hello"}, "alpaca", "FORMAT_MISMATCH", "looks like text"),
        ({"text": "hello"}, "csv", "UNKNOWN_FORMAT", "unknown data format 'csv'"),
        ([1, 2], "auto", "WRONG_TYPE", "expected a JSON object"),
    ],
)
def test_bad_records_have_a_reason_and_name_the_key(value: object, data_format: str, reason: str, needle: str) -> None:
    with pytest.raises(RecordError) as caught:
        parse_record(value, data_format)
    assert caught.value.reason == reason
    assert needle in caught.value.message


# --------------------------------------------------------------------------------------------------------- template


def test_load_chat_template_from_jinja_file_or_tokenizer_config(tmp_path: Path) -> None:
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    )
    assert load_chat_template(tmp_path) == "D"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "S"}))
    assert load_chat_template(tmp_path) == "S"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_chat_template(tmp_path) == "J"


def test_choose_chat_template_order(tmp_path: Path) -> None:
    assert choose_chat_template(tmp_path, "OVERRIDE") == ("OVERRIDE", "config")
    assert choose_chat_template(tmp_path) == (FALLBACK_CHAT_TEMPLATE, "fallback")
    with pytest.raises(TemplateError):
        choose_chat_template(tmp_path, allow_fallback=False)
    (tmp_path / "chat_template.jinja").write_text("J")
    assert choose_chat_template(tmp_path) == ("J", "tokenizer")


def test_render_fallback_chatml() -> None:
    messages = [Message("user", "Hi"), Message("assistant", "Hello")]
    assert (
        render(FALLBACK_CHAT_TEMPLATE, messages)
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert render(FALLBACK_CHAT_TEMPLATE, messages[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_render_matches_transformers_environment() -> None:
    """trim_blocks/lstrip_blocks, tojson without HTML escaping, generation blocks, loop controls, special tokens."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "  {% if m.role == 'assistant' %}{% generation %}{{ m.content | tojson }}{% endgeneration %}\n"
        "  {% else %}{{ m.content }}{% endif %}\n"
        "  {% if loop.index > 5 %}{% break %}{% endif %}\n"
        "{% endfor %}{{ eos_token }}{{ pad_token }}{% if add_generation_prompt %}>>{% endif %}"
    )
    messages = [{"role": "user", "content": "<a>"}, {"role": "assistant", "content": "é&\n"}]
    ours = render(template, messages, add_generation_prompt=True, bos_token="B", eos_token="E")
    theirs: Any = render_jinja_template(
        [messages], chat_template=template, add_generation_prompt=True, bos_token="B", eos_token="E"
    )
    assert ours == theirs[0][0]  # (rendered conversations, generation indices)
    assert '"é&\\n"' in ours  # tojson kept the non-ASCII character and did not HTML-escape `&`


def test_render_errors_become_template_errors() -> None:
    with pytest.raises(TemplateError, match="roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(TemplateError, match="does not compile"):
        render("{% for %}", [])


def test_training_never_reads_part_of_a_broken_file(tmp_path: Path) -> None:
    from finetune_server.errors import FinetuneError
    from finetune_server.training.data import iter_examples

    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"}, {"text": "b"}, {"text": ')
    examples = iter_examples(path)
    with pytest.raises(FinetuneError) as caught:
        list(examples)
    assert caught.value.reason == "DATASET_UNREADABLE" and "d.json" in caught.value.message
