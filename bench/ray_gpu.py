"""GPU check of `--executor ray` (run by bench/ray_gpu.sh, <= 5 minutes): a one-node Ray cluster with one GPU
(`ray start --head --num-gpus=1`), a server with `--executor ray --ray-gpus-per-job 1`, one tiny job.

Passes when the job succeeds, trained on `cuda:0`, and its worker saw exactly one CUDA device: the one Ray gave its
actor (CUDA_VISIBLE_DEVICES holds one id, never empty nor the host's list). Writes bench/results/ray_gpu.json.
Nothing is downloaded: the model is the tiny one the demo builds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from bench.common import RESULTS_DIR, write_json
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc

START_TIMEOUT_S = 90.0


def _start_head(temp_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    ray = str(Path(sys.executable).with_name("ray"))
    command = [
        ray, "start", "--head", "--block", "--port=0", "--num-gpus=1", "--num-cpus=4", "--include-dashboard=false",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    log = (temp_dir / "head.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    address_file = temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (address_file.is_file() and address_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"ray_gpu: the Ray head did not start; see {temp_dir / 'head.log'}")
        time.sleep(0.2)
    return process, address_file.read_text().strip()


def _start_server(work: Path, address: str, model_root: Path) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable, "-m", "finetune_server.cli.main", "serve", "--port", "0", "--data-dir", str(work / "data"),
        "--model-dir", str(model_root), "--dataset-dir", str(work), "--executor", "ray", "--ray-address", address,
        "--ray-gpus-per-job", "1", "--ray-cpus-per-job", "2",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = (work / "server.log").open("w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        raise SystemExit(f"ray_gpu: the server did not start: {line!r}; see {work / 'server.log'}")
    return process, line.removeprefix("listening on ").strip()


def _worker_started(worker_log: Path) -> dict[str, Any]:
    for line in worker_log.read_text().splitlines():
        if line.startswith("{") and '"worker started"' in line:
            return dict(json.loads(line))
    raise SystemExit(f"ray_gpu: no 'worker started' line in {worker_log}")


def run(out: Path) -> dict[str, Any]:
    from finetune_server.demo.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="raygpu", dir="/tmp"))  # short: Ray's socket paths live under it
    model = build_tiny_model(work / "models" / "tiny-qwen2")
    rows = [{"instruction": f"Code of agent {i}?", "output": f"Agent {i} uses Z{i * 37 % 1000}."} for i in range(24)]
    (work / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head, address = _start_head(work)
    server = None
    try:
        server, server_address = _start_server(work, address, model.parent)
        config = json_format.ParseDict(
            {"model_name": model.name, "dataset": "facts.jsonl", "max_steps": 6, "max_length": 128, "save_steps": 3},
            pb.TrainingConfig(),
        )
        with grpc.insecure_channel(server_address) as channel:
            stub = pb_grpc.FineTuneServiceStub(channel)
            stream = stub.Train(pb.TrainRequest(config=config), timeout=240)
            job = next(stream).job
            events = [m.event for m in stream]
            final = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job
        started = _worker_started(work / "data" / "jobs" / job.id / "worker.log")
        devices = {e.progress.memory.device for e in events if e.WhichOneof("kind") == "progress"}
        visible = str(started.get("visible_devices") or "")
        result = {
            "job_state": pb.JobState.Name(final.state),
            "steps": final.result.steps,
            "progress_devices": sorted(devices),
            "worker_visible_devices": visible,
            "ok": final.state == pb.JOB_STATE_SUCCEEDED
            and devices == {"cuda:0"}
            and len([d for d in visible.split(",") if d.strip()]) == 1,
        }
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    write_json(out, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ray_gpu.json")
    result = run(parser.parse_args().out)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
