"""A `finetune serve` subprocess on 127.0.0.1 port 0 (as tests/integration/conftest.py starts one)."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO, child_env


@dataclass
class Server:
    address: str
    process: subprocess.Popen[str]
    data_dir: Path
    log_path: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


def start_server(tmp: Path, model_root: Path, dataset_root: Path, *extra: str) -> Server:
    tmp.mkdir(parents=True, exist_ok=True)
    data_dir, log_path = tmp / "data", tmp / "server.log"
    command = [
        sys.executable, "-m", "finetune_server.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
        "--data-dir", str(data_dir), "--model-dir", str(model_root), "--dataset-dir", str(dataset_root),
        "--grace", "5", "--log-level", "warning", *extra,
    ]  # fmt: skip
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log_file, text=True, env=child_env(), cwd=REPO
        )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until the server has bound its port (or died)
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"server did not start: {line!r}\n{log_path.read_text()[-3000:]}")
    return Server(line.removeprefix("listening on ").strip(), process, data_dir, log_path)
