"""Every kind of dataset source through a real server and real workers: each trains a job; bad rows keep their
numbers over gRPC; skip_invalid_rows; Parquet uploads; hub datasets from a pre-populated hub cache, and a clear error
at once when HF_ENDPOINT points at nothing. No network."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc

from ..dataset_files import COMMIT, KINDS, closed_port, put_in_hub_cache, write_rows
from .conftest import RunningServer, start_server, stop_server
from .test_jobs import job_fields, states_of, train_to_end, upload

FACTS = [
    {"instruction": f"What is the code of agent {i}?", "output": f"Agent {i} uses Z{i * 37 % 1000}."} for i in range(12)
]
WITH_BAD_ROWS = [*FACTS[:2], {"instruction": "No answer"}, FACTS[2], {"text": " "}, FACTS[3]]  # rows 3 and 5
UNIT = {"jsonl": "line", "json": "element"}
HUB_ID = "org/facts"


_NAMES: dict[tuple[str, str], str] = {}  # (kind, "facts" or "bad") -> the name a config gives it


@pytest.fixture(scope="module")
def sources_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("sources-server")
    root = tmp_path_factory.mktemp("sources")
    for kind in KINDS[:-1]:
        for stem, rows in (("facts", FACTS), ("bad", WITH_BAD_ROWS)):
            _NAMES[(kind, stem)] = write_rows(root / kind, kind, rows, stem=stem).relative_to(root).as_posix()
    # The server's --hf-cache-dir, which its workers must read too (not HF_HOME's), offline.
    hub_cache = tmp / "hub-cache"
    put_in_hub_cache(hub_cache, HUB_ID, {"data/train-00000-of-00001.parquet": FACTS})
    put_in_hub_cache(hub_cache, "org/bad", {"data/train-00000-of-00001.parquet": WITH_BAD_ROWS})
    _NAMES[("hub", "facts")], _NAMES[("hub", "bad")] = HUB_ID, "org/bad"
    running = start_server(tmp, tiny_model_dir.parent, root, "--hf-cache-dir", str(hub_cache))
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def stub(sources_server: RunningServer) -> Iterator[pb_grpc.FineTuneServiceStub]:
    channel, stub = sources_server.stub()
    yield stub
    channel.close()


def config(model: str, **overrides: Any) -> pb.TrainingConfig:
    return json_format.ParseDict(job_fields(model, max_steps=2, save_steps=0, **overrides), pb.TrainingConfig())


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_source_trains_a_job(stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path, kind: str) -> None:
    job, events = train_to_end(stub, config(tiny_model_dir.name, dataset=_NAMES[(kind, "facts")]))
    assert states_of(events)[-1] == pb.JOB_STATE_SUCCEEDED, [e for e in events if e.WhichOneof("kind") == "log"]
    assert [e.progress.step for e in events if e.WhichOneof("kind") == "progress"] == [1, 2]
    if kind == "hub":
        assert (job.config.dataset_revision, job.config.dataset_split) == (COMMIT, "train"), "the job is pinned"


@pytest.mark.parametrize("kind", KINDS)
def test_bad_rows_keep_their_numbers_and_can_be_skipped(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path, kind: str
) -> None:
    request = pb.ValidateConfigRequest(config=config(tiny_model_dir.name, dataset=_NAMES[(kind, "bad")]))
    with pytest.raises(grpc.RpcError) as caught:
        stub.ValidateConfig(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    unit = UNIT.get(kind, "row")
    assert f": {unit} 3: " in (caught.value.details() or "")

    request.config.skip_invalid_rows = True
    report = stub.ValidateConfig(request, timeout=60)
    assert report.valid and report.dataset.num_invalid == 2 and report.dataset.file_format == kind
    skipped = [w for w in report.warnings if w.reason == "INVALID_ROWS_SKIPPED"]
    assert len(skipped) == 1 and skipped[0].message.startswith("2 of 6 records are invalid")


def test_a_job_skips_the_invalid_rows_it_was_allowed_to(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path
) -> None:
    _, events = train_to_end(
        stub, config(tiny_model_dir.name, dataset=_NAMES[("parquet", "bad")], skip_invalid_rows=True)
    )
    assert states_of(events)[-1] == pb.JOB_STATE_SUCCEEDED


def test_hub_subsets_and_splits_that_do_not_exist_are_named(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path
) -> None:
    for overrides, code, field in (
        ({"dataset_split": "validation"}, grpc.StatusCode.NOT_FOUND, "dataset_split"),
        ({"dataset_subset": "other"}, grpc.StatusCode.NOT_FOUND, "dataset_subset"),
        ({"dataset": "org/absent"}, grpc.StatusCode.NOT_FOUND, "dataset"),
    ):
        request = pb.ValidateConfigRequest(config=config(tiny_model_dir.name, **{"dataset": HUB_ID, **overrides}))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ValidateConfig(request, timeout=60)
        assert caught.value.code() == code, overrides
        assert (caught.value.details() or "").startswith(f"the training config is not valid: {field}: "), overrides


def test_a_parquet_upload_is_checked_then_trains(
    stub: pb_grpc.FineTuneServiceStub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    good = write_rows(tmp_path, "parquet", FACTS, stem="good").read_bytes()
    uploaded = upload(stub, good, filename="facts.parquet")
    assert uploaded.dataset.report.file_format == "parquet" and uploaded.dataset.report.num_valid == 12
    _, events = train_to_end(stub, config(tiny_model_dir.name, dataset=uploaded.dataset.id))
    assert states_of(events)[-1] == pb.JOB_STATE_SUCCEEDED

    bad = write_rows(tmp_path, "parquet", WITH_BAD_ROWS, stem="bad").read_bytes()
    for data, needle in ((bad, "row 3: "), (b'{"text": "I am JSON"}\n', "not a Parquet file")):
        with pytest.raises(grpc.RpcError) as caught:
            upload(stub, data, filename="data.parquet")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in (caught.value.details() or ""), caught.value.details()


def test_a_hub_endpoint_that_is_nowhere_is_a_clear_error_at_once(
    tmp_path: Path, server_roots: tuple[Path, Path], tiny_model_dir: Path
) -> None:
    nowhere = f"http://127.0.0.1:{closed_port()}"
    online = start_server(tmp_path, *server_roots, env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": nowhere})
    try:
        channel, stub = online.stub()
        request = pb.ValidateConfigRequest(config=config(tiny_model_dir.name, dataset="org/not-cached"))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ValidateConfig(request, timeout=60)
        assert time.monotonic() - started < 20
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert nowhere in (caught.value.details() or "") and "dataset: " in (caught.value.details() or "")
        channel.close()
    finally:
        stop_server(online)
