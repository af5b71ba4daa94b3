"""Worker memory is flat in the row count: 3 steps on 300k rows peak at most 1.5x the same job on 3k rows.

A real server and real workers; the peak is the worker's own (its progress events carry the process's peak resident
set on the CPU). A ratio within one run, never an absolute peak, and nothing timed. The growth per extra row is
recorded too (the junit property peak_bytes_per_extra_row: ~270 bytes measured, for per-example lengths and the batch
plan; holding the encoded examples as Python lists would cost over 1 KB a row).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc

from .conftest import RunningServer, start_server, stop_server

BIG, SMALL = 300_000, 3_000


def write_short_rows(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Code of {i}?", "output": f"Z{i % 997}."}) + "\n")
    return path


@pytest.fixture(scope="module")
def memory_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[RunningServer]:
    datasets = tmp_path_factory.mktemp("memory-datasets")
    write_short_rows(datasets / "big.jsonl", BIG)
    write_short_rows(datasets / "small.jsonl", SMALL)
    running = start_server(tmp_path_factory.mktemp("memory-server"), tiny_model_dir.parent, datasets)
    yield running
    stop_server(running)


def peak_worker_bytes(stub: pb_grpc.FineTuneServiceStub, model: str, dataset: str) -> tuple[int, list[str]]:
    fields = {
        "model_name": model,
        "dataset": dataset,
        "max_steps": 3,
        "max_length": 32,
        "per_device_train_batch_size": 4,
        "save_steps": 0,
        "logging_steps": 1,
        "lora": {"r": 4},
    }
    config = json_format.ParseDict(fields, pb.TrainingConfig())
    events = [m.event for m in stub.Train(pb.TrainRequest(config=config), timeout=600)][1:]
    progress = [e.progress for e in events if e.WhichOneof("kind") == "progress"]
    logs = [e.log.message for e in events if e.WhichOneof("kind") == "log"]
    assert [p.step for p in progress] == [1, 2, 3], logs
    return max(p.memory.peak_bytes for p in progress), logs


@pytest.mark.slow
def test_worker_peak_memory_does_not_grow_with_the_row_count(
    memory_server: RunningServer, tiny_model_dir: Path, record_property: Callable[[str, object], None]
) -> None:
    channel, stub = memory_server.stub()
    with channel:
        small, small_logs = peak_worker_bytes(stub, tiny_model_dir.name, "small.jsonl")
        big, big_logs = peak_worker_bytes(stub, tiny_model_dir.name, "big.jsonl")
    assert any(line.startswith(f"tokenized {BIG} examples into the token cache") for line in big_logs), big_logs
    assert any(line.startswith(f"tokenized {SMALL} examples into the token cache") for line in small_logs)
    per_row = (big - small) / (BIG - SMALL)
    record_property("peak_bytes_per_extra_row", round(per_row))  # the margin, in --junitxml reports
    assert big / small <= 1.5, (
        f"peak worker RSS {big / 2**20:.0f} MiB at {BIG} rows vs {small / 2**20:.0f} MiB at {SMALL} rows "
        f"({per_row:.0f} B per extra row)"
    )
