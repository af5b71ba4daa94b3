"""The dataset check (line numbers, reasons, caps, token statistics) and the training example stream."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.training.data.checks import check_dataset, iter_examples
from finetune_server.training.data.tokenizer import TextTokenizer

GOOD = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
    {"conversations": [{"from": "human", "value": "Count."}, {"from": "gpt", "value": "One two three."}]},
    {"question": "Who works?", "context": "The man works.", "answer": "The man."},
    {"text": "A plain line of text about the river."},
]


def _jsonl(path: Path, lines: list[object | bytes]) -> Path:
    with path.open("wb") as handle:
        for line in lines:
            handle.write(line if isinstance(line, bytes) else json.dumps(line).encode())
            handle.write(b"\n")
    return path


def test_every_bad_line_is_a_violation_with_its_number(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            GOOD[0],  # 1
            b"{not json",  # 2
            b'{"text": "caf\xe9"}',  # 3: latin-1, not UTF-8
            b"",  # 4: blank, skipped
            [1, 2],  # 5
            {"instruction": "x"},  # 6
            {"instruction": "x", "output": 7},  # 7
            {"text": "   "},  # 8
            {"messages": [{"role": "bot", "content": "x"}]},  # 9
            {"messages": [{"role": "user", "content": "x"}]},  # 10
            {"foo": "bar"},  # 11
            GOOD[4],  # 12
        ],
    )
    report = check_dataset(path, name="train.jsonl", field="dataset")
    found = [(v.line, v.reason) for v in report.violations]
    assert found == [
        (2, "INVALID_JSON"),
        (3, "INVALID_UTF8"),
        (5, "NOT_AN_OBJECT"),
        (6, "MISSING_FIELD"),
        (7, "WRONG_TYPE"),
        (8, "EMPTY_CONTENT"),
        (9, "UNKNOWN_ROLE"),
        (10, "NO_ASSISTANT_TURN"),
        (11, "UNKNOWN_FORMAT"),
    ]
    assert all(v.field == "dataset" and v.message.startswith(f"line {v.line}: ") for v in report.violations)
    assert "missing key 'output' (alpaca)" in report.violations[3].message
    assert (report.num_examples, report.num_valid, report.num_invalid) == (11, 2, 9)
    assert report.format_counts == {"alpaca": 1, "text": 1}
    assert report.file_format == "jsonl" and report.name == "train.jsonl"
    assert report.size_bytes == path.stat().st_size
    assert report.token_stats is None and not report.violations_truncated


def test_violations_are_capped_but_all_counted(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [GOOD[0]] + [b"{bad"] * 25)
    report = check_dataset(path, name="d", field="eval_dataset", max_violations=3)
    assert [v.line for v in report.violations] == [2, 3, 4]
    assert report.num_invalid == 25 and report.violations_truncated
    assert report.violations[0].field == "eval_dataset"


def test_empty_file_and_file_without_valid_examples(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    report = check_dataset(empty, name="empty.jsonl")
    assert [(v.reason, v.line) for v in report.violations] == [("EMPTY_DATASET", 0)]
    assert report.num_examples == 0

    bad = _jsonl(tmp_path / "bad.jsonl", [{"foo": 1}, b"[]"])
    report = check_dataset(bad, name="bad.jsonl")
    assert [(v.reason, v.line) for v in report.violations] == [
        ("UNKNOWN_FORMAT", 1),
        ("NOT_AN_OBJECT", 2),
        ("NO_VALID_EXAMPLES", 0),
    ]


def test_json_array_file_reports_element_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD[0], {"question": "q?"}, GOOD[3]], indent=2))
    report = check_dataset(path, name="d.json")
    assert report.file_format == "json"
    assert [(v.line, v.reason) for v in report.violations] == [(2, "MISSING_FIELD")]
    assert report.violations[0].message.startswith("element 2: ")
    assert report.format_counts == {"alpaca": 1, "qa": 1}


def test_json_file_that_is_not_an_array_is_one_file_violation(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('"hello"')
    report = check_dataset(path, name="d.json")
    assert [(v.reason, v.line) for v in report.violations] == [("NOT_AN_ARRAY", 0)]


def test_explicit_format_rejects_other_formats(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", GOOD)
    report = check_dataset(path, name="d", data_format="alpaca")
    assert report.num_valid == 1
    assert {v.reason for v in report.violations} == {"FORMAT_MISMATCH"}
    assert [v.line for v in report.violations] == [2, 3, 4, 5]


def test_missing_dataset_raises_not_found(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError) as caught:
        check_dataset(tmp_path / "nope.jsonl", name="nope.jsonl")
    assert caught.value.kind is ErrorKind.NOT_FOUND
    assert caught.value.violations[0].field == "dataset"


def test_token_stats_equal_transformers(
    tmp_path: Path, tiny_model_dir: Path, tokenizer: TextTokenizer, template: str
) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = GOOD * 4 + [{"instruction": "Say " + "the river " * 60, "output": "Done."}]
    path = _jsonl(tmp_path / "d.jsonl", records)
    report = check_dataset(path, name="d", tokenizer=tokenizer, template=template, max_length=64)

    expected = []
    for line, example in iter_examples(path):
        if example.is_conversation:
            expected.append(len(hf.apply_chat_template(example.message_dicts(), tokenize=True, return_dict=False)))
        else:
            expected.append(len(hf.encode(example.text, add_special_tokens=False)) + 1)  # + eos
        assert line >= 1
    ordered = sorted(expected)
    stats = report.token_stats
    assert stats is not None
    assert (stats.min, stats.max, stats.total) == (ordered[0], ordered[-1], sum(ordered))
    assert stats.mean == pytest.approx(sum(ordered) / len(ordered))
    assert stats.p50 == ordered[math.ceil(0.5 * len(ordered)) - 1]
    assert stats.p95 == ordered[math.ceil(0.95 * len(ordered)) - 1]
    assert report.num_over_max_length == sum(1 for n in expected if n > 64) == 1
    # The long prompt leaves no answer within 64 tokens: a warning, not a violation.
    assert [w.reason for w in report.warnings] == ["ANSWER_TRUNCATED"]
    assert report.warnings[0].message.startswith("line 21: ")
    assert report.violations == [] and report.num_valid == 21


def test_template_failures_are_violations(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('system not supported') }}{% endif %}"
        "{{ m.content }}{{ eos_token }}{% endfor %}"
    )
    with_system = {"instruction": "x", "output": "y", "system": "s"}
    path = _jsonl(tmp_path / "d.jsonl", [GOOD[0], with_system])
    report = check_dataset(path, name="d", tokenizer=tokenizer, template=template)
    assert [(v.line, v.reason) for v in report.violations] == [(2, "TEMPLATE_ERROR")]
    assert "system not supported" in report.violations[0].message
    assert (report.num_valid, report.num_invalid) == (1, 1)


def test_iter_examples_skips_bad_lines(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [GOOD[0], b"{bad", {"foo": 1}, GOOD[4]])
    examples = list(iter_examples(path))
    assert [(line, example.format) for line, example in examples] == [(1, "alpaca"), (4, "text")]
