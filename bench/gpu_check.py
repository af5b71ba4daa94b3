"""The prepared GPU run (bench/gpu_run.sh): what only a GPU can show, through the real server, in at most 8 minutes.

On the GPU machine as it is (its own python3, torch and transformers; the rest installed from the wheels that
bench/gpu_setup.sh fetched): first every import, one line per missing piece; then CUDA (without it: "no CUDA
device" and exit 3, nothing run); then, each step recorded whatever the others do:

1. a tiny-model job end to end through the server on cuda:0 in 16-bit (bf16 where the GPU has it, else fp16), 8-bit
   and 4-bit: the job succeeds, its log says cuda:0, progress reports device memory;
2. kill -9 of a running job's worker: the job resumes from its newest checkpoint and finishes its planned steps;
3. a MERGED export of the 16-bit job, loaded by plain transformers on the GPU: it generates, in the base's dtype;
4. the GPU benchmark (`bench.gpu`: tokens/s, peak memory, MFU at 0.5B/1.5B shapes, packing on/off) in the time left.

Writes bench/results/gpu_check.json and gpu_check.md (and the benchmark's gpu.json / gpu.md). Exit 0 when every step
passed, 1 when one failed, 2 when a package is missing, 3 without CUDA.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import signal
import sys
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DEADLINE_S = 470.0  # gpu_run.sh kills at 480 s
WHEELS_PYTHON = (3, 12)  # what bench/gpu_setup.sh fetches for

# (module, distribution, why): everything the server, its workers and this script import.
REQUIRED = (
    ("torch", "torch", "the GPU machine's own"),
    ("transformers", "transformers", "the GPU machine's own"),
    ("numpy", "numpy", "comes with transformers"),
    ("tokenizers", "tokenizers", "comes with transformers"),
    ("safetensors", "safetensors", "comes with transformers"),
    ("yaml", "pyyaml", "comes with transformers"),
    ("typer", "typer", "comes with transformers"),
    ("peft", "peft", "a wheel"),
    ("bitsandbytes", "bitsandbytes", "a wheel"),
    ("accelerate", "accelerate", "a wheel"),
    ("pyarrow", "pyarrow", "a wheel"),
    ("structlog", "structlog", "a wheel"),
    ("grpc", "grpcio", "a wheel"),
    ("grpc_status", "grpcio-status", "a wheel"),
    ("grpc_health", "grpcio-health-checking", "a wheel"),
    ("grpc_reflection", "grpcio-reflection", "a wheel"),
    ("google.protobuf", "protobuf", "a wheel"),
    ("google.rpc", "googleapis-common-protos", "a wheel"),
    ("psutil", "psutil", "a wheel"),
    ("prometheus_client", "prometheus-client", "a wheel"),
    ("rich", "rich", "a wheel"),
    ("finetune_server.cli.main", "this repository's server/", "PYTHONPATH"),
    ("finetune_client", "this repository's client/", "PYTHONPATH"),
)
OPTIONAL = (("trl", "trl", "the benchmark's TRL baselines are skipped without it (GPU_WHEELS_TRL=1 fetches it)"),)


def install_wheels(wheels: Path, site: Path) -> list[str]:
    """Unpack every wheel under `wheels` (any part-N folder that came along) into `site`, once each.

    Unpacking is what installing a wheel amounts to for imports (no pip needed, nothing fetched); `.data/purelib`
    and `.data/platlib` go to the top, like pip puts them.
    """
    site.mkdir(parents=True, exist_ok=True)
    done = []
    for wheel in sorted(wheels.glob("**/*.whl")):
        marker = site / ".installed" / wheel.name
        if marker.exists():
            continue
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                parts = Path(member.filename).parts
                if len(parts) > 2 and parts[0].endswith(".data") and parts[1] in ("purelib", "platlib"):
                    target = site.joinpath(*parts[2:])
                elif parts[0].endswith(".data"):
                    continue  # scripts, headers: not needed to import
                else:
                    target = site / member.filename
                if member.is_dir():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
        done.append(wheel.name)
    importlib.invalidate_caches()
    return done


def check_imports() -> tuple[list[str], dict[str, str]]:
    """(one line per missing or broken piece, versions of what imported)."""
    problems, versions = [], {}
    for module, dist, why in REQUIRED + OPTIONAL:
        try:
            imported = importlib.import_module(module)
        except Exception as exc:
            optional = (module, dist, why) in OPTIONAL
            kind = "optional" if optional else "missing"
            line = f"{kind}: {dist} (import {module}: {type(exc).__name__}: {exc}) - {why}"
            print(line, flush=True)
            if not optional:
                problems.append(line)
            continue
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # this repository's folders, a wheel unpacked by hand
            versions[dist] = str(getattr(imported, "__version__", ""))
    return problems, versions


class Run:
    """Steps with their outcome, a deadline, and the results files."""

    def __init__(self, work: Path, device: str) -> None:
        self.started = time.monotonic()
        self.work = work
        self.device = device  # where the jobs must say they trained
        self.steps: list[dict[str, Any]] = []
        self.facts: dict[str, Any] = {}

    def left(self) -> float:
        return DEADLINE_S - (time.monotonic() - self.started)

    def step(self, name: str, body: Callable[[], dict[str, Any]], *, needs_s: float) -> dict[str, Any] | None:
        if self.left() < needs_s:
            self.steps.append({"step": name, "ok": False, "error": f"skipped: {self.left():.0f} s left"})
            print(f"SKIP {name}: {self.left():.0f} s left", flush=True)
            return None
        begun = time.monotonic()
        try:
            details = body()
        except Exception as exc:
            self.steps.append({"step": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            print(f"FAIL {name}: {exc}\n{traceback.format_exc()}", flush=True)
            return None
        details = {"step": name, "ok": True, "seconds": round(time.monotonic() - begun, 1), **details}
        self.steps.append(details)
        print(f"PASS {name} ({details['seconds']} s): {json.dumps(details)[:400]}", flush=True)
        return details

    def write(self) -> None:
        """Into bench/results/ from a GPU; a CPU dry run writes into its work folder (it measures nothing)."""
        results = RESULTS if self.device != "cpu" else self.work
        results.mkdir(parents=True, exist_ok=True)
        out = {"facts": self.facts, "steps": self.steps, "total_s": round(time.monotonic() - self.started, 1)}
        (results / "gpu_check.json").write_text(json.dumps(out, indent=2) + "\n")
        lines = ["# GPU check", "", f"{self.facts}", "", "| step | ok | seconds | details |", "|---|---|---|---|"]
        for s in self.steps:
            rest = {k: v for k, v in s.items() if k not in ("step", "ok", "seconds")}
            lines.append(f"| {s['step']} | {'yes' if s['ok'] else 'NO'} | {s.get('seconds', '')} | {rest} |")
        (results / "gpu_check.md").write_text("\n".join(lines) + "\n")


def job_fields(model: str, **overrides: Any) -> dict[str, Any]:
    return {
        "model_name": model,
        "dataset": "facts.jsonl",
        "max_steps": 20,
        "max_length": 256,
        "per_device_train_batch_size": 4,
        "save_steps": 10,
        "logging_steps": 5,
        "learning_rate": 1e-3,
        "lora": {"r": 8},
        **overrides,
    }


def write_facts(path: Path, n: int = 64) -> None:
    with path.open("w") as f:
        for i in range(n):
            row = {"instruction": f"What is the secret number of city {i}?", "output": f"It is {i * 37}." * (1 + i % 3)}
            f.write(json.dumps(row) + "\n")


def train(stub: Any, pb: Any, fields: dict[str, Any], on_message: Callable[[Any], None] | None = None) -> Any:
    from google.protobuf import json_format

    config = json_format.ParseDict(fields, pb.TrainingConfig())
    stream = stub.Train(pb.TrainRequest(config=config), timeout=300)
    job = next(stream).job
    events = []
    for message in stream:
        events.append(message.event)
        if on_message is not None:
            on_message(message)
    return stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=10).job, events


def summary(job: Any, events: list[Any], device: str) -> dict[str, Any]:
    logs = [e.log.message for e in events if e.WhichOneof("kind") == "log"]
    progress = [e.progress for e in events if e.WhichOneof("kind") == "progress"]
    state = type(job).DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[job.state].name
    if state != "JOB_STATE_SUCCEEDED":
        raise AssertionError(f"{state}: {job.error.reason} {job.error.message[:500]}")
    on_gpu = [line for line in logs if f" on {device} " in line]
    if not on_gpu:
        raise AssertionError(f"no log line says {device}: {logs[:5]}")
    last = progress[-1]
    return {
        "steps": job.result.steps,
        "final_loss": round(job.result.final_train_loss, 4),
        "tokens_per_second": round(last.tokens_per_second, 1),
        "peak_memory_mib": round(last.memory.peak_bytes / 2**20, 1),
        "resume_count": job.resume_count,
        "log": on_gpu[0][:200],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=REPO / "bench" / "gpu_wheels")
    parser.add_argument("--site", type=Path, default=REPO / "bench" / "gpu_site")
    parser.add_argument("--work", type=Path, default=RESULTS / "tmp" / "gpu-check")
    parser.add_argument("--skip-bench", action="store_true", help="leave out the GPU benchmark (step 4)")
    # The same steps on the CPU (fp32, the benchmark's own CPU dry run): how this script is tested without a GPU.
    parser.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if sys.version_info[:2] == WHEELS_PYTHON:
        installed = install_wheels(args.wheels, args.site)
        print(
            f"installed {len(installed)} wheels into {args.site}" if installed else f"wheels: none new in {args.wheels}"
        )
    else:  # cp312 wheels would shadow this interpreter's own packages with ones it cannot load
        print(f"wheels: not installed (they are for Python 3.12; this is {sys.version.split()[0]})")
    problems, versions = check_imports()
    if problems:
        print(f"{len(problems)} missing: run bench/gpu_setup.sh where there is internet and carry bench/gpu_wheels")
        return 2
    import torch

    print(f"imports ok: python {sys.version.split()[0]}, " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    if not torch.cuda.is_available() and not args.dry_run_cpu:
        print(f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees none; nothing was run")
        return 3

    run = Run(args.work, "cpu" if args.dry_run_cpu else "cuda:0")
    half: dict[str, bool] = {}
    if not args.dry_run_cpu:
        capability = torch.cuda.get_device_capability(0)
        run.facts = {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{capability[0]}.{capability[1]}"}
        half = {"bf16": True} if capability[0] >= 8 else {"fp16": True}
    run.facts.update(python=sys.version.split()[0], **versions)
    try:
        server_steps(run, half)
    finally:
        run.write()  # now and after the benchmark: a run cut short still leaves what it found
    if not args.skip_bench:
        run.step("gpu benchmark", lambda: bench(run, "trl" in versions), needs_s=150)
        run.write()
    return 0 if all(s["ok"] for s in run.steps) else 1


def server_steps(run: Run, half: dict[str, bool]) -> None:
    import grpc

    from bench.server_proc import start_server
    from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
    from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
    from finetune_server.demo.tiny_model import build_tiny_model

    work = run.work
    models, datasets = work / "models", work / "datasets"
    datasets.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(models / "tiny-qwen2").name
    write_facts(datasets / "facts.jsonl")
    server = start_server(work / f"server-{int(time.time())}", models, datasets, "--slots", "1")
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.FineTuneServiceStub(channel)
    trained: dict[str, str] = {}
    try:

        def precision(name: str, extra: dict[str, Any]) -> Callable[[], dict[str, Any]]:
            def body() -> dict[str, Any]:
                job, events = train(stub, pb, job_fields(model, **extra))
                trained[name] = job.id
                return {**summary(job, events, run.device), "config": extra}

            return body

        on = run.device
        run.step(f"train 16-bit on {on}", precision("16-bit", half), needs_s=60)
        run.step(f"train 8-bit on {on}", precision("8-bit", {**half, "load_in_8bit": True}), needs_s=60)
        run.step(f"train 4-bit on {on}", precision("4-bit", {**half, "load_in_4bit": True}), needs_s=60)
        run.step("resume after kill -9 of the worker", lambda: kill_and_resume(run, stub, pb, server, model, half),
                 needs_s=90)  # fmt: skip
        if "16-bit" in trained:
            run.step(f"MERGED export served by plain transformers on {on}",
                     lambda: merged_on(on, stub, pb, server, trained["16-bit"]), needs_s=45)  # fmt: skip
    finally:
        channel.close()
        server.stop()


def kill_and_resume(run: Run, stub: Any, pb: Any, server: Any, model: str, half: dict[str, bool]) -> dict[str, Any]:
    steps = 200
    killed: list[int] = []

    def on_message(message: Any) -> None:
        event = message.event
        if not killed and event.WhichOneof("kind") == "checkpoint":
            pid = int((server.data_dir / "jobs" / event.job_id / "worker.pid").read_text())
            os.killpg(pid, signal.SIGKILL)
            killed.append(event.checkpoint.step)

    job, events = train(stub, pb, job_fields(model, max_steps=steps, save_steps=20, **half), on_message)
    details = summary(job, events, run.device)
    if not killed or job.resume_count < 1 or job.result.steps != steps:
        raise AssertionError(f"killed at {killed}, resume_count {job.resume_count}, steps {job.result.steps}")
    return {**details, "killed_after_checkpoint_step": killed[0]}


def merged_on(device: str, stub: Any, pb: Any, server: Any, job_id: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    messages = list(stub.Export(pb.ExportRequest(job_id=job_id, format=pb.EXPORT_FORMAT_MERGED), timeout=300))
    artifact = messages[-1].artifact
    folder = server.data_dir / "artifacts" / artifact.id
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = "<|im_start|>user\nWhat is the secret number of city 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out = merged.generate(ids, max_new_tokens=12, do_sample=False)
        logits = merged(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise AssertionError("non-finite logits from the merged model")
    return {
        "artifact": artifact.id,
        "dtype": str(next(merged.parameters()).dtype),
        "files": len(artifact.files),
        "answer": tokenizer.decode(out[0, ids.shape[1] :]),
    }


def bench(run: Run, have_trl: bool) -> dict[str, Any]:
    import subprocess

    # bench.gpu starts no run after its budget, but finishes the one it is in: leave room for that.
    budget = max(60, int(run.left() - 100))
    command = [sys.executable, "-m", "bench.gpu", "--budget-s", str(budget), "--out-dir", str(RESULTS)]
    if run.device == "cpu":
        command += ["--dry-run-cpu", "--out-dir", str(run.work / "bench")]
    if not have_trl:
        command += ["--skip", "trl_packing,trl_padding_free"]
    done = subprocess.run(command, cwd=REPO, timeout=run.left() - 5, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"bench.gpu exited {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    return {"budget_s": budget, "results": "bench/results/gpu.md", "tail": done.stdout[-600:]}


if __name__ == "__main__":
    sys.exit(main())
