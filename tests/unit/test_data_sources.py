"""Dataset sources: every kind read as numbered records, one problem for a table no format fits, files that are not
what they say, fingerprints, refs a worker reopens, and hub datasets read from a hub cache (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from finetune_server.errors import ErrorKind, FinetuneError
from finetune_server.training.data.checks import check_dataset, iter_examples
from finetune_server.training.data.hub import HubOptions, fetch_dataset
from finetune_server.training.data.sources import DatasetSource, iter_records

from ..dataset_files import COMMIT, KINDS, put_in_hub_cache, write_rows

# Rows 2 and 4 are bad: no output, an empty instruction.
ROWS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Name a fruit.", "output": None},
    {"instruction": "Name a city.", "output": "Oslo."},
    {"instruction": " ", "output": "Nothing."},
    {"instruction": "Name a number.", "output": "42"},
]
ZIPPED_CSV = b"PK\x03\x04\x14\x00\x00\x00\x08\x00\x9d\x81\xf3Z" + bytes(range(128, 256)) * 8
UNIT = {"jsonl": "line", "json": "element"}  # every other kind counts rows
TWO_SUBSETS = """---
configs:
- config_name: short
  data_files:
  - split: train
    path: short/train-*.parquet
  - split: test
    path: short/test-*.parquet
- config_name: long
  data_files: long/*.parquet
---
"""


def _source(tmp_path: Path, kind: str, rows: list[dict[str, object]]) -> DatasetSource:
    if kind != "hub":
        return DatasetSource.local(write_rows(tmp_path, kind, rows))
    cache = tmp_path / "hub-cache"
    put_in_hub_cache(cache, "org/facts", {"data/train-00000-of-00001.parquet": rows})
    options = HubOptions(cache_dir=cache, offline=True)
    return fetch_dataset("org/facts", subset="", split="", revision="", options=options, field="dataset")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_reports_bad_rows_with_their_numbers(tmp_path: Path, kind: str) -> None:
    source = _source(tmp_path, kind, ROWS)
    report = check_dataset(source, name="facts", field="dataset")
    unit = UNIT.get(kind, "row")
    missing = "EMPTY_CONTENT" if kind == "csv" else "MISSING_FIELD"  # a CSV cell is never null, only empty
    assert [(v.line, v.reason) for v in report.violations] == [(2, missing), (4, "EMPTY_CONTENT")]
    assert all(v.message.startswith(f"{unit} {v.line}: ") for v in report.violations), report.violations
    assert (report.num_examples, report.num_valid, report.num_invalid) == (5, 3, 2)
    assert report.file_format == kind and report.size_bytes > 0
    good = [(number, example.messages[-1].content) for number, example in iter_examples(source)]
    assert good == [(1, "Blue."), (3, "Oslo."), (5, "42")]


def test_conversations_in_a_table_are_lists_of_structs(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    report = check_dataset(DatasetSource.local(write_rows(tmp_path, "parquet", rows)), name="chat")
    assert report.format_counts == {"messages": 1} and not report.violations


def test_csv_cells_are_text_and_a_malformed_row_keeps_its_number(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(
        b"question,answer\n"
        b"What is six times seven?,42\n"  # row 1: a number stays text
        b"Too,many,cells\n"  # row 2
        b"Too few\n"  # row 3
        b'"A question\nover two lines?",yes\n'  # row 4: one row
        b"\xff\xfe,latin\n"  # row 5: not UTF-8
        b"Last?,last\n"  # row 6
        b"Trailing,bad,row\n"  # row 7
    )
    source = DatasetSource.local(path)
    records = list(iter_records(source))
    assert [(r.line, r.reason) for r in records] == [
        (1, None),
        (2, "BAD_ROW"),
        (3, "BAD_ROW"),
        (4, None),
        (5, "INVALID_UTF8"),
        (6, None),
        (7, "BAD_ROW"),
    ]
    assert records[0].value == {"question": "What is six times seven?", "answer": "42"}
    assert records[3].value is not None and records[3].value["question"] == "A question\nover two lines?"
    assert "expected 2 cells" in (records[1].error or "")
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tsource\nA line of text.\tweb\n")
    assert [r.value for r in iter_records(DatasetSource.local(tsv))] == [{"text": "A line of text.", "source": "web"}]


@pytest.mark.parametrize("kind", ["parquet", "csv", "arrow", "saved"])
def test_columns_no_format_fits_are_one_violation_not_one_per_row(tmp_path: Path, kind: str) -> None:
    source = DatasetSource.local(
        write_rows(tmp_path, kind, [{"prompt": f"p{i}", "completion": "c"} for i in range(50)])
    )
    report = check_dataset(source, name="d")
    assert [(v.line, v.reason) for v in report.violations] == [(0, "UNKNOWN_COLUMNS")]
    message = report.violations[0].message
    assert "'prompt', 'completion'" in message and "alpaca" in message and "messages" in message


def test_columns_that_lack_what_the_chosen_format_needs_are_one_violation(tmp_path: Path) -> None:
    source = DatasetSource.local(write_rows(tmp_path, "parquet", [{"question": "q", "answer": "a"}] * 3))
    report = check_dataset(source, name="d", data_format="alpaca")
    assert [(v.line, v.reason) for v in report.violations] == [(0, "UNKNOWN_COLUMNS")]
    assert "'instruction'" in report.violations[0].message and "'output'" in report.violations[0].message
    only_instruction = DatasetSource.local(write_rows(tmp_path / "b", "parquet", [{"instruction": "i"}] * 3))
    report = check_dataset(only_instruction, name="d")
    assert [v.reason for v in report.violations] == ["UNKNOWN_COLUMNS"] and "'output'" in report.violations[0].message


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("d.parquet", b'{"text": "I am JSON"}\n', "NOT_PARQUET"),
        ("d.arrow", b"PAR1 but not arrow at all", "NOT_ARROW"),
        ("d.csv", ZIPPED_CSV, "INVALID_CSV"),  # a zip file named .csv
    ],
)
def test_a_file_that_is_not_its_format_is_one_file_violation(
    tmp_path: Path, name: str, content: bytes, reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    report = check_dataset(DatasetSource.local(path), name=name)
    assert [(v.line, v.reason) for v in report.violations] == [(0, reason)]
    assert report.violations[0].message.startswith(f"{name}: ")


def test_parquet_and_arrow_are_recognised_by_their_magic_bytes(tmp_path: Path) -> None:
    parquet = write_rows(tmp_path, "parquet", ROWS[:1])
    renamed = parquet.rename(tmp_path / "upload.bin")
    assert DatasetSource.local(renamed).file_format == "parquet"


def test_fingerprint_follows_the_content(tmp_path: Path) -> None:
    first = write_rows(tmp_path / "a", "parquet", ROWS)
    copy = tmp_path / "b.parquet"
    shutil.copy(first, copy)
    assert DatasetSource.local(first).fingerprint() == DatasetSource.local(copy).fingerprint()
    write_rows(tmp_path / "b-new", "parquet", ROWS[:2]).replace(copy)
    assert DatasetSource.local(first).fingerprint() != DatasetSource.local(copy).fingerprint()

    saved = write_rows(tmp_path / "s", "saved", ROWS)
    same = write_rows(tmp_path / "t", "saved", ROWS)
    assert DatasetSource.local(saved).fingerprint() == DatasetSource.local(same).fingerprint()
    hub = DatasetSource("hub", "org/x", "hub", split="train", revision=COMMIT)
    assert hub.fingerprint() != DatasetSource("hub", "org/x", "hub", split="test", revision=COMMIT).fingerprint()
    assert hub.fingerprint() != DatasetSource("hub", "org/x", "hub", split="train", revision="f" * 40).fingerprint()


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved", "hub"])
def test_a_worker_reopens_a_source_from_its_ref(tmp_path: Path, kind: str) -> None:
    source = _source(tmp_path, kind, ROWS)
    # The engine holds the ref as a Path for a while, which keeps one slash of hf://.
    ref = str(Path(source.ref))
    again = DatasetSource.from_ref(ref, split="", hub_cache_dir=tmp_path / "hub-cache")
    assert again == source
    assert [n for n, _ in iter_examples(source)] == [1, 3, 5]


def test_a_saved_dataset_dict_reads_the_split_asked_for(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(folder))
    assert DatasetSource.local(folder).split == "train"
    assert check_dataset(DatasetSource.local(folder, split="test"), name="d").num_examples == 1
    with pytest.raises(FinetuneError) as caught:
        DatasetSource.local(folder, split="validation", field="eval_dataset")
    assert caught.value.kind is ErrorKind.NOT_FOUND and caught.value.reason == "SPLIT_NOT_FOUND"
    assert caught.value.violations[0].field == "eval_dataset_split" and "train, test" in caught.value.message


def _two_subsets(tmp_path: Path) -> HubOptions:
    cache = tmp_path / "hub-cache"
    put_in_hub_cache(
        cache,
        "org/two",
        {
            "README.md": TWO_SUBSETS,
            "short/train-0.parquet": ROWS[:1] * 3,
            "short/test-0.parquet": ROWS[:1],
            "long/all.parquet": ROWS[:1] * 7,
        },
    )
    return HubOptions(cache_dir=cache, offline=True)


def test_a_hub_dataset_reads_the_subset_and_split_of_its_card(tmp_path: Path) -> None:
    options = _two_subsets(tmp_path)

    def count(subset: str, split: str) -> tuple[str, int]:
        source = fetch_dataset("org/two", subset=subset, split=split, revision="", options=options, field="dataset")
        assert source.revision == COMMIT
        return source.split, check_dataset(source, name="org/two").num_examples

    assert count("short", "") == ("train", 3)
    assert count("short", "test") == ("test", 1)
    assert count("long", "") == ("train", 7)


@pytest.mark.parametrize(
    ("subset", "split", "kind", "reason", "field", "names"),
    [
        ("", "", ErrorKind.INVALID_ARGUMENT, "SUBSET_REQUIRED", "dataset_subset", "short, long"),
        ("medium", "", ErrorKind.NOT_FOUND, "SUBSET_NOT_FOUND", "dataset_subset", "short, long"),
        ("short", "validation", ErrorKind.NOT_FOUND, "SPLIT_NOT_FOUND", "dataset_split", "train, test"),
    ],
)
def test_a_subset_or_split_that_does_not_exist_names_those_that_do(
    tmp_path: Path, subset: str, split: str, kind: ErrorKind, reason: str, field: str, names: str
) -> None:
    options = _two_subsets(tmp_path)
    with pytest.raises(FinetuneError) as caught:
        fetch_dataset("org/two", subset=subset, split=split, revision="", options=options, field="dataset")
    assert (caught.value.kind, caught.value.reason) == (kind, reason)
    assert caught.value.violations[0].field == field and names in caught.value.message


def test_offline_a_hub_dataset_the_cache_lacks_is_not_found(tmp_path: Path) -> None:
    options = _two_subsets(tmp_path)
    for repo_id, revision in (("org/absent", ""), ("org/two", "v2")):
        with pytest.raises(FinetuneError) as caught:
            fetch_dataset(repo_id, subset="short", split="", revision=revision, options=options, field="eval_dataset")
        assert (caught.value.kind, caught.value.reason) == (ErrorKind.NOT_FOUND, "DATASET_NOT_CACHED_OFFLINE")
        assert caught.value.violations[0].field == "eval_dataset"


def test_json_rows_in_a_table_are_read_as_they_are(tmp_path: Path) -> None:
    """A messages column holding JSON text (as CSV must) is a string, reported as such, not parsed by guesswork."""
    rows = [{"messages": json.dumps([{"role": "user", "content": "x"}])}]
    report = check_dataset(DatasetSource.local(write_rows(tmp_path, "csv", rows)), name="d")
    assert [(v.line, v.reason) for v in report.violations] == [(1, "WRONG_TYPE"), (0, "NO_VALID_EXAMPLES")]


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ({"README.md": "---\nconfigs: [\n  - bad: : yaml\n---\n", "data/train.parquet": ROWS}, "UNREADABLE_DATASET"),
        ({"README.md": "---\nconfigs:\n- config_name: x\n  data_files: 5\n---\n"}, "UNREADABLE_DATASET"),
        ({"README.md": "# A card and no data\n"}, "NO_DATA_FILES"),
    ],
)
def test_a_hub_repository_datasets_cannot_read_is_the_dataset_s_error(
    tmp_path: Path, files: dict[str, Any], reason: str
) -> None:
    put_in_hub_cache(tmp_path, "org/odd", files)
    with pytest.raises(FinetuneError) as caught:
        options = HubOptions(cache_dir=tmp_path, offline=True)
        fetch_dataset("org/odd", subset="", split="", revision="", options=options, field="dataset")
    assert (caught.value.kind, caught.value.reason) == (ErrorKind.INVALID_ARGUMENT, reason)
    assert caught.value.violations[0].field == "dataset"


def test_damaged_files_in_a_hub_snapshot_or_saved_folder_are_one_file_violation(tmp_path: Path) -> None:
    snapshot = put_in_hub_cache(tmp_path / "hub", "org/damaged", {"data/train.parquet": ROWS})
    (snapshot / "data" / "train.parquet").write_bytes(b"PAR1 damaged PAR1")
    options = HubOptions(cache_dir=tmp_path / "hub", offline=True)
    hub = fetch_dataset("org/damaged", subset="", split="", revision="", options=options, field="dataset")
    saved = write_rows(tmp_path, "saved", ROWS)
    for arrow in saved.glob("*.arrow"):
        arrow.write_bytes(b"damaged")
    for source in (hub, DatasetSource.local(saved)):
        report = check_dataset(source, name="d")
        assert [(v.line, v.reason) for v in report.violations] == [(0, "UNREADABLE_DATASET")], source
