"""Finding the dataset a config names (uploads, local files and folders, hub datasets) and what validation makes of
it: pinned hub commits, skipped invalid rows, and a clear error with the right kind and field for each bad input.
The hub is a pre-populated hub cache, a local HTTP fake of its API, or a closed port: never the network."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from finetune_server.errors import ErrorKind
from finetune_server.settings import ServerSettings
from finetune_server.training.config import TrainingConfig
from finetune_server.training.validation import ValidationReport, validate

from ..dataset_files import COMMIT, closed_port, put_in_hub_cache, write_rows

GOOD = [{"instruction": f"What is the code of agent {i}?", "output": f"Z{i}."} for i in range(6)]
NOT_FOUND, DENIED = ErrorKind.NOT_FOUND, ErrorKind.PERMISSION_DENIED
WITH_BAD_ROWS = [*GOOD[:2], {"instruction": "No answer"}, GOOD[2], {"text": " "}, GOOD[3]]  # rows 3 and 5 are bad


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    root = tmp_path / "datasets"
    root.mkdir()
    return root


def _settings(tmp_path: Path, tiny_model_dir: Path, **kwargs: Any) -> ServerSettings:
    return ServerSettings(
        data_dir=tmp_path / "data",
        model_roots=[tiny_model_dir.parent],
        dataset_roots=[tmp_path / "datasets"],
        hf_cache_dir=tmp_path / "hub-cache",
        **kwargs,
    )


def _validate(settings: ServerSettings, model: Path, **fields: Any) -> ValidationReport:
    return validate(TrainingConfig(model_name=model.name, max_length=128, **fields), settings)


def _rejection(report: ValidationReport, kind: ErrorKind, reason: str, field: str) -> str:
    assert not report.valid and report.error_kind is kind, report.violations
    matching = [v for v in report.violations if v.reason == reason and v.field == field]
    assert matching, report.violations
    return matching[0].message


@pytest.fixture(autouse=True)
def _no_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # each test says whether the server is offline


def test_a_hub_dataset_from_the_cache_is_pinned_to_its_commit(
    tmp_path: Path, roots: Path, tiny_model_dir: Path
) -> None:
    put_in_hub_cache(tmp_path / "hub-cache", "org/agents", {"data/train-00000-of-00001.parquet": GOOD})
    report = _validate(_settings(tmp_path, tiny_model_dir, offline=True), tiny_model_dir, dataset="org/agents")
    assert report.valid, report.violations
    assert report.dataset is not None and report.dataset.file_format == "hub" and report.dataset.num_valid == 6
    assert report.dataset.token_stats is not None and report.dataset.token_stats.total > 0
    resolved = report.resolved_config
    assert (resolved.dataset_revision, resolved.dataset_split) == (COMMIT, "train"), "a job trains what was checked"


def test_an_unreachable_hub_uses_the_cache_or_fails_fast(tmp_path: Path, roots: Path, tiny_model_dir: Path) -> None:
    nowhere = f"http://127.0.0.1:{closed_port()}"
    settings = _settings(tmp_path, tiny_model_dir, hf_endpoint=nowhere)
    started = time.monotonic()
    report = _validate(settings, tiny_model_dir, dataset="org/agents")
    assert time.monotonic() - started < 20, "a hub that cannot be reached is known at once, without retries"
    message = _rejection(report, ErrorKind.UNAVAILABLE, "HUB_UNREACHABLE", "dataset")
    assert nowhere in message and "org/agents" in message

    put_in_hub_cache(tmp_path / "hub-cache", "org/agents", {"data/train-00000-of-00001.parquet": GOOD})
    assert _validate(settings, tiny_model_dir, dataset="org/agents").valid


def test_offline_a_dataset_the_cache_lacks_is_not_found(tmp_path: Path, roots: Path, tiny_model_dir: Path) -> None:
    report = _validate(_settings(tmp_path, tiny_model_dir, offline=True), tiny_model_dir, dataset="org/absent")
    message = _rejection(report, ErrorKind.NOT_FOUND, "DATASET_NOT_CACHED_OFFLINE", "dataset")
    assert "offline" in message


class _FakeHubApi(BaseHTTPRequestHandler):
    """The hub's dataset API as huggingface_hub reads it: a status and an X-Error-Code per repository."""

    answers: ClassVar[dict[str, tuple[int, str]]] = {
        "org/missing": (404, "RepoNotFound"),
        "org/gated": (403, "GatedRepo"),
        "org/private": (401, "GatedRepo"),
    }

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0].removeprefix("/api/datasets/")
        repo = "/".join(path.split("/")[:2])
        status, code = (404, "RevisionNotFound") if "/revision/nope" in path else self.answers.get(repo, (500, ""))
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def fake_hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHubApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("fields", "kind", "reason", "field"),
    [
        ({"dataset": "org/missing"}, NOT_FOUND, "DATASET_NOT_FOUND", "dataset"),
        ({"dataset": "org/gated"}, DENIED, "DATASET_GATED", "dataset"),
        ({"dataset": "org/private"}, DENIED, "DATASET_GATED", "dataset"),
        (
            {"dataset": "org/agents", "dataset_revision": "nope"},
            ErrorKind.NOT_FOUND,
            "REVISION_NOT_FOUND",
            "dataset_revision",
        ),
        (
            {"dataset": "facts.jsonl", "eval_dataset": "org/gated"},
            ErrorKind.PERMISSION_DENIED,
            "DATASET_GATED",
            "eval_dataset",
        ),
    ],
)
def test_what_the_hub_answers_is_a_clear_error_with_its_field(
    tmp_path: Path,
    roots: Path,
    tiny_model_dir: Path,
    fake_hub: str,
    fields: dict[str, str],
    kind: ErrorKind,
    reason: str,
    field: str,
) -> None:
    write_rows(roots, "jsonl", GOOD, stem="facts")
    report = _validate(_settings(tmp_path, tiny_model_dir, hf_endpoint=fake_hub), tiny_model_dir, **fields)
    _rejection(report, kind, reason, field)


def test_hub_datasets_can_be_refused_by_the_server(tmp_path: Path, roots: Path, tiny_model_dir: Path) -> None:
    put_in_hub_cache(tmp_path / "hub-cache", "org/agents", {"data/train-00000-of-00001.parquet": GOOD})
    write_rows(roots, "parquet", GOOD, stem="local")
    settings = _settings(tmp_path, tiny_model_dir, offline=True, allow_hub_datasets=False)
    report = _validate(settings, tiny_model_dir, dataset="org/agents")
    _rejection(report, ErrorKind.PERMISSION_DENIED, "HUB_DATASETS_NOT_ALLOWED", "dataset")
    assert _validate(settings, tiny_model_dir, dataset="local.parquet").valid


def test_a_local_folder_named_like_a_hub_id_is_the_local_one(tmp_path: Path, roots: Path, tiny_model_dir: Path) -> None:
    write_rows(roots / "org", "saved", GOOD, stem="agents")
    report = _validate(_settings(tmp_path, tiny_model_dir, offline=True), tiny_model_dir, dataset="org/agents")
    assert report.valid and report.dataset is not None and report.dataset.file_format == "saved"


def test_a_folder_that_is_not_a_saved_dataset_is_refused(tmp_path: Path, roots: Path, tiny_model_dir: Path) -> None:
    write_rows(roots / "shards", "jsonl", GOOD)
    report = _validate(_settings(tmp_path, tiny_model_dir), tiny_model_dir, dataset="shards")
    _rejection(report, ErrorKind.INVALID_ARGUMENT, "NOT_A_DATASET_FOLDER", "dataset")


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "arrow", "saved"])
def test_skip_invalid_rows_turns_bad_rows_into_a_counted_warning(
    tmp_path: Path, roots: Path, tiny_model_dir: Path, kind: str
) -> None:
    name = write_rows(roots, kind, WITH_BAD_ROWS).name
    settings = _settings(tmp_path, tiny_model_dir)
    refused = _validate(settings, tiny_model_dir, dataset=name)
    assert not refused.valid and [v.line for v in refused.violations] == [3, 5]

    report = _validate(settings, tiny_model_dir, dataset=name, skip_invalid_rows=True)
    assert report.valid, report.violations
    skipped = [w for w in report.warnings if w.reason == "INVALID_ROWS_SKIPPED"]
    assert len(skipped) == 1 and skipped[0].field == "dataset"
    assert skipped[0].message.startswith("2 of 6 records are invalid and will be skipped")
    assert report.dataset is not None and (report.dataset.num_valid, report.dataset.num_invalid) == (4, 2)


def test_skip_invalid_rows_does_not_hide_a_dataset_that_cannot_be_used(
    tmp_path: Path, roots: Path, tiny_model_dir: Path
) -> None:
    write_rows(roots, "parquet", [{"prompt": "p", "completion": "c"}] * 3, stem="columns")
    write_rows(roots, "jsonl", [{"instruction": "no answer"}] * 3, stem="all-bad")
    settings = _settings(tmp_path, tiny_model_dir)
    for name, reason in (("columns.parquet", "UNKNOWN_COLUMNS"), ("all-bad.jsonl", "NO_VALID_EXAMPLES")):
        report = _validate(settings, tiny_model_dir, dataset=name, skip_invalid_rows=True)
        assert not report.valid and reason in {v.reason for v in report.violations}, name


def test_options_a_local_file_has_no_use_for_are_warned_about(
    tmp_path: Path, roots: Path, tiny_model_dir: Path
) -> None:
    write_rows(roots, "jsonl", GOOD, stem="facts")
    report = _validate(_settings(tmp_path, tiny_model_dir), tiny_model_dir, dataset="facts.jsonl", dataset_split="test")
    assert report.valid
    assert [(w.field, w.reason) for w in report.warnings if w.reason == "IGNORED"] == [("dataset_split", "IGNORED")]


def test_eval_dataset_has_its_own_split(tmp_path: Path, roots: Path, tiny_model_dir: Path) -> None:
    put_in_hub_cache(
        tmp_path / "hub-cache",
        "org/agents",
        {"data/train-00000-of-00001.parquet": GOOD, "data/test-00000-of-00001.parquet": GOOD[:2]},
    )
    settings = _settings(tmp_path, tiny_model_dir, offline=True)
    report = _validate(
        settings, tiny_model_dir, dataset="org/agents", eval_dataset="org/agents", eval_dataset_split="test"
    )
    assert report.valid, report.violations
    assert report.dataset is not None and report.eval_dataset is not None
    assert (report.dataset.num_examples, report.eval_dataset.num_examples) == (6, 2)
    report = _validate(
        settings, tiny_model_dir, dataset="org/agents", eval_dataset="org/agents", eval_dataset_split="dev"
    )
    assert "train, test" in _rejection(report, ErrorKind.NOT_FOUND, "SPLIT_NOT_FOUND", "eval_dataset_split")


def test_validating_tables_imports_no_training_library(tmp_path: Path, roots: Path, tiny_model_dir: Path) -> None:
    """Parquet, CSV and Arrow are read with pyarrow alone on the RPC path; `datasets` is for folders and the hub."""
    for kind in ("parquet", "csv", "arrow"):
        write_rows(roots, kind, GOOD)
    code = f"""
import sys
from pathlib import Path
from finetune_server.settings import ServerSettings
from finetune_server.training.config import TrainingConfig
from finetune_server.training.validation import validate
settings = ServerSettings(data_dir=Path({str(tmp_path / "data")!r}), model_roots=[Path({str(tiny_model_dir.parent)!r})],
                          dataset_roots=[Path({str(roots)!r})])
for name in ("data.parquet", "data.csv", "data.arrow"):
    report = validate(TrainingConfig(model_name={tiny_model_dir.name!r}, dataset=name), settings)
    assert report.valid, report.violations
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "transformers", "peft", "datasets"}})
print(heavy)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_name_neither_local_nor_a_valid_hub_id_is_invalid(tmp_path: Path, roots: Path, tiny_model_dir: Path) -> None:
    report = _validate(_settings(tmp_path, tiny_model_dir), tiny_model_dir, dataset=f"org/{'x' * 120}")
    _rejection(report, ErrorKind.INVALID_ARGUMENT, "INVALID_DATASET_NAME", "dataset")
