"""A real `finetune serve` process on 127.0.0.1 port 0, with the tiny model under its model root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.faults import ENV_VAR as FAULTS_ENV_VAR

GRACE_S = 5  # the servers' --grace: what in-flight calls get on SIGTERM


@dataclass
class RunningServer:
    address: str
    process: subprocess.Popen[str]
    model_root: Path
    dataset_root: Path
    data_dir: Path
    log_path: Path

    def stub(self) -> tuple[grpc.Channel, pb_grpc.FineTuneServiceStub]:
        channel = grpc.insecure_channel(self.address)
        return channel, pb_grpc.FineTuneServiceStub(channel)


def start_server(
    tmp: Path,
    model_root: Path,
    dataset_root: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    data_dir: Path | None = None,
    prewarm: bool = False,
) -> RunningServer:
    """A server offline (HF_HUB_OFFLINE=1) with its own HF_HOME (`tmp/hf-home`); `env` adds to or overrides that.
    Its data dir is `tmp/data` unless `data_dir` names one (several servers may share it). Its warm pool starts with
    the first job unless `prewarm` (the served default): the fork server's imports are ~10 s of CPU that a test
    server which never trains would spend for nothing, and the suite runs on 2 cores."""
    data_dir = data_dir or tmp / "data"
    log_path = tmp / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home"), **(env or {})}
    command = [
        sys.executable, "-m", "finetune_server.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
        "--data-dir", str(data_dir), "--model-dir", str(model_root), "--dataset-dir", str(dataset_root),
        "--grace", str(GRACE_S), *([] if prewarm else ["--no-prewarm-workers"]), *extra,
    ]  # fmt: skip
    log_file = log_path.open("w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until the server has bound its port (or died)
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"server did not start: {line!r}\n{log_path.read_text()}")
    address = line.removeprefix("listening on ").strip()
    return RunningServer(address, process, model_root, dataset_root, data_dir, log_path)


def stop_server(server: RunningServer) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    return server.process.wait(timeout=30)


def logged(server: RunningServer, event: str) -> list[dict[str, object]]:
    """The server's JSON log records of `event`."""
    lines = server.log_path.read_text().splitlines()
    return [record for line in lines if line.startswith("{") and (record := json.loads(line))["event"] == event]


def wait_for_log_event(server: RunningServer, event: str, timeout: float = 60, **fields: object) -> dict[str, object]:
    """The first JSON log record of the server with this event and these fields, waiting for it up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        for line in server.log_path.read_text().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
                return dict(record)
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event!r} log record with {fields} within {timeout} s")
        time.sleep(0.1)  # polling the log file: there is no other signal to wait on


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def server_roots(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    dataset_root = tmp_path_factory.mktemp("datasets")
    write_jsonl(
        dataset_root / "facts.jsonl",
        [
            {
                "instruction": f"What is the secret code of agent {i}?",
                "output": f"Agent {i} uses code Z{i * 37 % 1000}.",
            }
            for i in range(24)
        ],
    )
    return tiny_model_dir.parent, dataset_root


@pytest.fixture(scope="module")
def flaky_server(tmp_path_factory: pytest.TempPathFactory, server_roots: tuple[Path, Path]) -> Iterator[RunningServer]:
    """A server that refuses the first call of each FineTuneService method with UNAVAILABLE (one per test module:
    the first calls it refuses are spent once)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULTS_ENV_VAR, "unavailable_first_calls=1")
        running = start_server(tmp_path_factory.mktemp("flaky-server"), *server_roots)
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, server_roots: tuple[Path, Path]) -> Iterator[RunningServer]:
    model_root, dataset_root = server_roots
    running = start_server(tmp_path_factory.mktemp("server"), model_root, dataset_root, prewarm=True)
    yield running
    stop_server(running)


# Servers with the flags that several modules' tests need, shared for the session (each start of one is a fork
# server's ~10 s of imports at its first job).

ALICE, BOB, ADMIN = "alice-token-0123456789", "bob-token-0123456789ab", "admin-token-0123456789"


@pytest.fixture(scope="session")
def jobs_server(tmp_path_factory: pytest.TempPathFactory, server_roots: tuple[Path, Path]) -> Iterator[RunningServer]:
    """Uploads limited to 200,000 bytes (test_jobs, test_idempotency)."""
    running = start_server(tmp_path_factory.mktemp("jobs-server"), *server_roots, "--max-upload-bytes", "200000")
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory: pytest.TempPathFactory, server_roots: tuple[Path, Path]) -> Iterator[RunningServer]:
    """Tokens for alice, bob and an admin (test_security, test_idempotency)."""
    tmp = tmp_path_factory.mktemp("auth")
    tokens = tmp / "tokens.txt"
    tokens.write_text(f"# test tokens\n{ALICE} alice\n{BOB} bob\n\n{ADMIN} ops admin\n")
    running = start_server(tmp, *server_roots, "--auth-token-file", str(tokens))
    yield running
    stop_server(running)
