"""The `finetune` command line against a real server: every command, its output and its exit code.

Each command runs as `python -m finetune_server.cli.main` in a subprocess (as a user would run it), with COLUMNS=100 and
FINETUNE_SERVER pointing at a server on 127.0.0.1 port 0 that trains the tiny model with real workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import RunningServer, start_server, stop_server, write_jsonl
from .test_jobs import job_fields

UNREACHABLE = "127.0.0.1:1"
JOB_ID = re.compile(r"job-[0-9a-f]+")


def cli_env(address: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "100", "FINETUNE_SERVER": address}


def cli(address: str, *args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "finetune_server.cli.main", *map(str, args)]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=cli_env(address), timeout=timeout)


def popen_cli(address: str, *args: str | Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "finetune_server.cli.main", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(address))


def read_until(process: subprocess.Popen[str], pattern: str) -> str:
    """Lines of the process's output up to and including the first that matches `pattern` (fails at EOF)."""
    assert process.stdout is not None
    seen = ""
    for line in process.stdout:
        seen += line
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"the output ended before {pattern!r}:\n{seen}")


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory, server_roots: tuple[Path, Path]) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("cli-server"), *server_roots)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def address(cli_server: RunningServer) -> str:
    return cli_server.address


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-configs")
    base = job_fields(tiny_model_dir.name)
    (folder / "train.json").write_text(json.dumps(base))
    # YAML as people write it: `1e-3` without a dot is a string to plain YAML 1.1 loaders.
    (folder / "train.yaml").write_text(
        f"model_name: {tiny_model_dir.name}\ndataset: facts.jsonl\nmax_steps: 6\nmax_length: 128\n"
        "learning_rate: 1e-3\nlora:\n  r: 8\n"
    )
    (folder / "unknown.json").write_text(json.dumps({**base, "lora": {"rank": 8}, "epochs": 2}))
    return {"json": folder / "train.json", "yaml": folder / "train.yaml", "unknown": folder / "unknown.json"}


@pytest.fixture(scope="module")
def trained_job(address: str, configs: dict[str, Path]) -> tuple[str, subprocess.CompletedProcess[str]]:
    """A job started with `train --detach`, then followed to its end with `watch`."""
    started = cli(address, "train", configs["json"], "--detach", "--name", "detached")
    assert started.returncode == 0, started.stdout + started.stderr
    job_id = started.stdout.strip()
    assert JOB_ID.fullmatch(job_id), f"--detach prints only the job id, got {started.stdout!r}"
    assert f"finetune watch {job_id}" in started.stderr
    return job_id, cli(address, "watch", job_id)


# ----------------------------------------------------------------------------------------------------------------------
# no server needed
# ----------------------------------------------------------------------------------------------------------------------


def test_help_lists_every_command_and_the_cli_imports_stay_light() -> None:
    result = cli(UNREACHABLE, "--help")
    assert result.returncode == 0
    for command in ("serve", "demo", "validate", "train", "watch", "jobs", "cancel", "export", "upload", "presets"):
        assert command in result.stdout
    assert "recommend" in result.stdout and "artifacts" in result.stdout and "datasets" in result.stdout
    probe = (
        "import sys, finetune_server.cli.main; print(sorted({'torch', 'grpc', 'finetune_client'} & set(sys.modules)))"
    )
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]", "`finetune --help` must not load torch, grpc or the client"


def test_an_unreachable_server_is_one_line_naming_the_address_and_exit_2(configs: dict[str, Path]) -> None:
    for args in (["jobs", "list"], ["validate", configs["json"]], ["train", configs["json"]]):
        result = cli(UNREACHABLE, *args, "--server", UNREACHABLE)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach the server at {UNREACHABLE}: "), lines
        assert "Traceback" not in result.stderr


def test_usage_errors_exit_2_with_a_clear_message(configs: dict[str, Path], tmp_path: Path) -> None:
    missing = cli(UNREACHABLE, "validate", tmp_path / "nope.yaml")
    assert missing.returncode == 2 and f"config file not found: {tmp_path / 'nope.yaml'}" in missing.stderr
    bad_set = cli(UNREACHABLE, "validate", configs["json"], "--set", "lora.r")
    assert bad_set.returncode == 2 and "expected FIELD=VALUE" in bad_set.stderr
    (tmp_path / "broken.json").write_text('{"model_name": "x",\n "dataset": }')
    broken = cli(UNREACHABLE, "validate", tmp_path / "broken.json")
    assert broken.returncode == 2 and "not valid JSON" in broken.stderr and "line 2" in broken.stderr
    size = cli(UNREACHABLE, "recommend", "--gpu-memory", "lots")
    assert size.returncode == 2 and "cannot read 'lots' as a memory size" in size.stderr
    no_ca = cli(UNREACHABLE, "presets", "--tls-ca", tmp_path / "ca.pem")
    assert no_ca.returncode == 2 and f"cannot read the TLS CA file {tmp_path / 'ca.pem'}" in no_ca.stderr
    for result in (missing, bad_set, broken, size, no_ca):
        assert "Traceback" not in result.stderr and result.stdout == ""


# ----------------------------------------------------------------------------------------------------------------------
# validate
# ----------------------------------------------------------------------------------------------------------------------


def test_validate_a_good_config_shows_the_estimate_and_device_verdicts(address: str, configs: dict[str, Path]) -> None:
    result = cli(address, "validate", configs["json"], "--target-device", "rtx_3060")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ valid" in result.stdout
    assert "Memory estimate" in result.stdout and "base model weights" in result.stdout and "total" in result.stdout
    verdicts = result.stdout[result.stdout.index("Fits the device?") :]
    assert re.search(r"rtx_3060\s+│\s+12\.0 GiB.*✓ fits", verdicts), verdicts
    assert "dataset: facts.jsonl (24 examples, 24 valid, 0 invalid" in result.stdout


def test_validate_json_of_a_yaml_config_with_overrides(address: str, configs: dict[str, Path]) -> None:
    report = as_json(cli(address, "validate", configs["yaml"], "--json", "--set", "lora.r=16", "--set", "seed=7"))
    assert report["valid"] is True
    resolved = report["resolved_config"]
    assert resolved["learning_rate"] == pytest.approx(1e-3), "YAML `1e-3` is read as a number"
    assert resolved["lora"]["r"] == 16 and resolved["seed"] == 7
    assert report["memory_estimate"]["total_bytes"] > 0 and report["memory_estimate"]["fits"]


def test_validate_an_invalid_config_names_the_field_and_exits_1(address: str, configs: dict[str, Path]) -> None:
    result = cli(address, "validate", configs["json"], "--set", "lora.r=0", "--set", "dataset=missing.jsonl")
    assert result.returncode == 1
    assert "✗ invalid" in result.stdout
    assert re.search(r"│ lora\.r\s+│\s+│ OUT_OF_RANGE", result.stdout), result.stdout
    assert re.search(r"│ dataset\s+│\s+│ DATASET_NOT_FOUND", result.stdout), result.stdout
    report = json.loads(cli(address, "validate", configs["json"], "--set", "lora.r=0", "--json").stdout)
    assert report["valid"] is False and [v["field"] for v in report["violations"]] == ["lora.r"]


def test_validate_unknown_keys_are_violations_and_exit_1(address: str, configs: dict[str, Path]) -> None:
    result = cli(address, "validate", configs["unknown"])
    assert result.returncode == 1
    assert re.search(r"│ lora\.rank\s+│\s+│ UNKNOWN_FIELD", result.stdout), result.stdout
    assert re.search(r"│ epochs\s+│\s+│ UNKNOWN_FIELD", result.stdout), result.stdout


def test_a_refused_upload_lists_the_bad_lines_and_exits_1(address: str, tmp_path: Path) -> None:
    rows: list[object] = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]
    rows[2] = {"instruction": "no answer"}
    refused = cli(address, "upload", write_jsonl(tmp_path / "bad-line.jsonl", rows))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert re.search(r"│ dataset\s+│\s+3 │ MISSING_FIELD", refused.stderr), refused.stderr
    assert "Traceback" not in refused.stderr


# ----------------------------------------------------------------------------------------------------------------------
# train, watch, cancel
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_detach_then_watch_to_completion(trained_job: tuple[str, subprocess.CompletedProcess[str]]) -> None:
    job_id, watched = trained_job
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert f"watching job {job_id}" in watched.stdout
    assert f"job {job_id} queued" in watched.stdout and f"job {job_id} running" in watched.stdout
    assert "step 6/6" in watched.stdout and "tok/s" in watched.stdout and "ETA" in watched.stdout
    assert f"✓ job {job_id} succeeded: 6 steps" in watched.stdout
    assert f"finetune export {job_id}" in watched.stdout


@pytest.mark.slow
def test_train_with_the_live_display_to_completion(address: str, configs: dict[str, Path]) -> None:
    result = cli(address, "train", configs["yaml"], "--set", "save_steps=3")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = JOB_ID.search(result.stdout).group(0)  # type: ignore[union-attr]
    assert f"job {job_id} created (queued)" in result.stdout
    assert "checkpoint at step 3" in result.stdout and "checkpoint at step 6" in result.stdout
    bar = next(line for line in result.stdout.splitlines() if "step 6/6" in line)
    assert bar.startswith("succeeded") and re.search(r"loss \d+\.\d{4}\s+lr \S+\s+[\d,]+ tok/s\s+ETA 0:00:00", bar)
    assert re.search(r"mem \d", bar), bar
    assert f"✓ job {job_id} succeeded: 6 steps, final loss" in result.stdout


@pytest.mark.slow
def test_ctrl_c_detaches_without_cancelling_then_cancel_ends_the_watch_with_exit_1(
    address: str, configs: dict[str, Path]
) -> None:
    trainer = popen_cli(address, "train", configs["json"], "--set", "max_steps=100000", "--name", "long")
    seen = read_until(trainer, r"job job-[0-9a-f]+ queued")  # the first event: the live display is up
    job_id = JOB_ID.search(seen).group(0)  # type: ignore[union-attr]
    trainer.send_signal(signal.SIGINT)
    rest = trainer.communicate(timeout=30)[0]
    assert trainer.returncode == 130, seen + rest
    assert f"detached from job {job_id}; it keeps running" in rest and f"finetune watch {job_id}" in rest
    assert "Traceback" not in rest and "Aborted" not in rest
    after = as_json(cli(address, "jobs", "show", job_id, "--json"))
    assert after["state"] in {"queued", "running"} and not after["cancel_requested"], "Ctrl-C must not cancel"

    watcher = popen_cli(address, "watch", job_id)
    read_until(watcher, rf"job {job_id} running")
    cancelled = cli(address, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert job_id in cancelled.stdout and "cancel" in cancelled.stdout
    rest = watcher.communicate(timeout=120)[0]
    assert watcher.returncode == 1, rest
    assert f"job {job_id} cancelled" in rest and f"job {job_id} was cancelled at step" in rest
    assert as_json(cli(address, "jobs", "show", job_id, "--json"))["state"] == "cancelled"
    again = cli(address, "cancel", job_id)
    assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr, "a finished job cannot be cancelled"


def test_a_rejected_training_config_shows_the_violations_and_exits_1(address: str, configs: dict[str, Path]) -> None:
    result = cli(address, "train", configs["json"], "--set", "dataset=missing.jsonl")
    assert result.returncode == 1
    assert re.search(r"│ dataset\s+│\s+│ DATASET_NOT_FOUND", result.stdout), result.stdout
    assert "created" not in result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# jobs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_jobs_list_filters_and_limits(address: str, trained_job: tuple[str, Any]) -> None:
    job_id, _ = trained_job
    everything = as_json(cli(address, "jobs", "list", "--json"))
    assert job_id in [job["id"] for job in everything]
    created = [job["create_time"] for job in everything]
    assert created == sorted(created, reverse=True), "newest first"
    succeeded = as_json(cli(address, "jobs", "list", "--state", "succeeded", "--state", "failed", "--json"))
    assert job_id in [job["id"] for job in succeeded]
    assert {job["state"] for job in succeeded} <= {"succeeded", "failed"}
    assert len(as_json(cli(address, "jobs", "list", "--limit", "1", "--json"))) == 1
    table = cli(address, "jobs", "list", "--state", "succeeded")
    assert table.returncode == 0 and job_id in table.stdout and "detached" in table.stdout
    bad_state = cli(address, "jobs", "list", "--state", "sleeping")
    assert bad_state.returncode == 2


@pytest.mark.slow
def test_jobs_show_and_the_loss_curve(address: str, trained_job: tuple[str, Any], tmp_path: Path) -> None:
    job_id, _ = trained_job
    shown = as_json(cli(address, "jobs", "show", job_id, "--json"))
    assert shown["id"] == job_id and shown["state"] == "succeeded" and shown["result"]["steps"] == 6
    table = cli(address, "jobs", "show", job_id)
    assert table.returncode == 0 and "succeeded" in table.stdout and "final loss" in table.stdout
    assert "lora.r=8" in table.stdout
    png = tmp_path / "curve.png"
    plotted = cli(address, "jobs", "show", job_id, "--plot", png)
    assert plotted.returncode == 0, plotted.stdout + plotted.stderr
    assert f"loss curve written to {png} (6 train points, 0 eval points)" in plotted.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (800, 500)
    unknown = cli(address, "jobs", "show", "job-0000000000000000")
    assert unknown.returncode == 2 and "NOT_FOUND" in unknown.stderr and "Traceback" not in unknown.stderr


# ----------------------------------------------------------------------------------------------------------------------
# export, upload, presets, recommend
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_an_adapter_refuses_to_overwrite_without_force(
    address: str, trained_job: tuple[str, Any], tmp_path: Path
) -> None:
    job_id, _ = trained_job
    output = tmp_path / "adapter"
    first = cli(address, "export", job_id, "--format", "adapter", "--output", output)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (output / "adapter_model.safetensors").is_file() and (output / "chat_template.jinja").is_file()
    flat = " ".join(first.stdout.split())  # rich wraps long lines (this one holds a temp path of varying length)
    assert "every SHA-256 verified" in flat and "adapter_config.json" in first.stdout
    before = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}

    refused = cli(address, "export", job_id, "--format", "adapter", "--output", output)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in output.iterdir()} == before, "nothing was touched"

    forced = as_json(cli(address, "export", job_id, "--format", "adapter", "--output", output, "--force", "--json"))
    assert forced["success"] and forced["format"] == "adapter" and forced["artifact_id"].startswith("art-")
    on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in output.iterdir()}
    assert {f["path"]: f["sha256"] for f in forced["files"]} == on_disk


def test_upload_a_dataset(address: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(5)])
    first = cli(address, "upload", path)
    assert first.returncode == 0, first.stdout + first.stderr
    dataset_id = "ds-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert f"✓ uploaded {dataset_id}" in first.stdout and "5 examples, 5 valid, 0 invalid (qa 5)" in first.stdout
    again = as_json(cli(address, "upload", path, "--format", "qa", "--json"))
    assert again["id"] == dataset_id and again["already_existed"] is True
    assert cli(address, "upload", tmp_path / "absent.jsonl").returncode == 2


def test_datasets_list_show_and_rm(address: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "listed.jsonl", [{"text": f"listed row {i}"} for i in range(4)])
    dataset_id = as_json(cli(address, "upload", path, "--json"))["id"]
    listed = cli(address, "datasets", "list")
    assert listed.returncode == 0 and dataset_id in listed.stdout and "listed.jsonl" in listed.stdout
    assert any(d["id"] == dataset_id for d in as_json(cli(address, "datasets", "list", "--json")))
    shown = as_json(cli(address, "datasets", "show", dataset_id, "--json"))
    assert shown["filename"] == "listed.jsonl" and shown["report"]["num_valid"] == 4
    removed = cli(address, "datasets", "rm", dataset_id)
    assert removed.returncode == 0 and f"✓ deleted {dataset_id} (listed.jsonl)" in removed.stdout
    again = cli(address, "datasets", "rm", dataset_id)
    assert again.returncode == 2 and dataset_id in again.stderr  # NOT_FOUND: a usage error, as for jobs
    assert dataset_id not in cli(address, "datasets", "list").stdout


@pytest.mark.slow
def test_labels_jobs_rm_and_artifacts_list_show_rm(
    address: str, configs: dict[str, Path], trained_job: tuple[str, Any], tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:12]
    long_run = ("--set", "max_steps=100000", "--set", "save_steps=0")
    started = cli(
        address, "train", configs["json"], "--detach", "--label", f"run={run}", "--label", "suite=cli", *long_run
    )
    assert started.returncode == 0, started.stdout + started.stderr
    job_id = started.stdout.strip()
    refused = cli(address, "jobs", "rm", job_id)  # queued or running
    assert refused.returncode == 1 and "JOB_NOT_FINISHED" in refused.stderr and job_id in refused.stderr
    listed = as_json(cli(address, "jobs", "list", "--label", f"run={run}", "--json"))
    assert [job["id"] for job in listed] == [job_id] and listed[0]["labels"] == {"run": run, "suite": "cli"}
    assert cli(address, "jobs", "list", "--label", "run").returncode == 2, "KEY=VALUE expected"
    assert cli(address, "cancel", job_id).returncode == 0
    assert cli(address, "watch", job_id).returncode == 1, "it ends cancelled"
    removed = cli(address, "jobs", "rm", job_id, "--with-artifacts")
    assert removed.returncode == 0 and f"✓ deleted {job_id} and 0 artifacts: " in removed.stdout
    assert as_json(cli(address, "jobs", "list", "--label", f"run={run}", "--json")) == []

    trained_id, _ = trained_job
    artifact_id = as_json(cli(address, "export", trained_id, "--output", tmp_path / "adapter", "--json"))["artifact_id"]
    listed_artifacts = as_json(cli(address, "artifacts", "list", "--job", trained_id, "--json"))
    assert artifact_id in [a["id"] for a in listed_artifacts]
    shown = cli(address, "artifacts", "show", artifact_id)
    assert shown.returncode == 0 and trained_id in shown.stdout and "adapter" in shown.stdout
    gone = cli(address, "artifacts", "rm", artifact_id)
    assert gone.returncode == 0 and f"✓ deleted {artifact_id} (job {trained_id}): " in gone.stdout
    again = cli(address, "artifacts", "show", artifact_id, "--json")
    assert again.returncode == 2 and artifact_id in again.stderr  # NOT_FOUND


def test_presets(address: str) -> None:
    table = cli(address, "presets")
    assert table.returncode == 0 and "rtx_3060" in table.stdout and "load_in_8bit=True" in table.stdout
    data = as_json(cli(address, "presets", "--json"))
    names = [p["name"] for p in data["presets"]]
    assert {"rtx_3060", "minimal"} <= set(names)
    minimal = next(p for p in data["presets"] if p["name"] == "minimal")
    assert minimal["config"]["lora"] == {"r": 8} and minimal["device_memory_bytes"] == 0


def test_recommend_for_a_12gb_card(address: str) -> None:
    table = cli(address, "recommend", "--gpu-memory", "12GB")
    assert table.returncode == 0, table.stdout + table.stderr
    models = re.findall(r"Qwen/[\w.-]+", table.stdout)
    assert models[0] == "Qwen/Qwen2.5-Coder-1.5B-Instruct", table.stdout
    assert "does not fit: Qwen/Qwen2.5-7B-Instruct needs 20.0 GiB" in table.stdout
    data = as_json(cli(address, "recommend", "--gpu-memory", "12GB", "--json"))
    assert data["gpu_memory_bytes"] == 12 * 2**30
    assert data["fits"][0]["model_name"] == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert "Qwen/Qwen2.5-7B-Instruct" in [r["model_name"] for r in data["does_not_fit"]]
    assert all(r["min_gpu_memory_bytes"] <= 12 * 2**30 for r in data["fits"])
    nothing = cli(address, "recommend", "--gpu-memory", "1GB")
    assert nothing.returncode == 1 and "no recommended model trains in 1.0 GiB" in nothing.stdout
