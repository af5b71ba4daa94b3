"""Smoke run of the benchmarks (`python -m bench --quick`): each runs at the smallest size and writes well-formed
results. No timing is asserted (machines are shared and noisy); what is asserted is that every benchmark ran the
same work for every method it compares, and that the results are strict JSON plus a markdown report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = ("engine", "startup", "service", "rpc", "memory", "data")

pytestmark = pytest.mark.slow  # ~1-2 minutes: four benchmarks, each with fresh processes that import torch


def _reject_nan(token: str) -> float:
    raise ValueError(f"results.json contains {token}: not strict JSON")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench-results")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out-dir", str(out), "--work-dir", str(out / "work")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text(), parse_constant=_reject_nan)
    return results, (out / "results.md").read_text()


def test_every_benchmark_ran_and_reported_its_targets(quick_results: tuple[dict[str, Any], str]) -> None:
    results, markdown = quick_results
    assert results["quick"] is True
    assert list(results["sections"]) == list(BENCHMARKS)
    for name, section in results["sections"].items():
        assert section["error"] == "", f"{name} failed:\n{section['error']}"
        assert section["targets"], f"{name} reported no target"
        for target in section["targets"]:
            assert set(target) >= {"name", "value", "target", "met"}
            assert target["met"] in (True, False, None)
            assert f"| {target['name']} |" in markdown
    assert markdown.startswith("# sage-finetune benchmarks")
    for heading in (
        "## Targets",
        "## Engine throughput",
        "## Start-up",
        "## Service overhead",
        "## RPC latency",
        "## Memory",
        "## Datasets of any size",
    ):
        assert heading in markdown


def test_engine_methods_train_the_same_tokens(quick_results: tuple[dict[str, Any], str]) -> None:
    sizes = quick_results[0]["sections"]["engine"]["data"]["sizes"]
    (size,) = sizes.values()
    methods = size["methods"]
    assert {"ours", "hf_padded", "hf_dynamic", "trl_packing", "trl_padding_free", "raw"} <= set(methods)
    assert {m["tokens"] for m in methods.values()} == {size["lengths"]["tokens"]}, "every method trains the same data"
    assert all(m["tokens_per_s"] > 0 and m["peak_rss_bytes"] > 0 for m in methods.values())
    # The floor compares step loops: ours' lies inside its training call (which adds the final checkpoint).
    assert 0 < methods["ours"]["loop_s"] <= methods["ours"]["train_s"]
    assert methods["raw"]["loop_s"] == methods["raw"]["train_s"]
    # The bare loop runs our batch plan from the same seed: the same work, so the same final loss.
    assert methods["raw"]["final_loss"] == pytest.approx(methods["ours"]["final_loss"], rel=1e-3)
    assert all(isinstance(v, float) and v > 0 for v in size["ratios"].values())


def test_startup_times_the_same_job_on_both_servers(quick_results: tuple[dict[str, Any], str]) -> None:
    data = quick_results[0]["sections"]["startup"]["data"]
    runs = data["runs"]
    assert sorted(r["mode"] for r in runs) == ["fresh", "pool"]
    assert len({r["steps"] for r in runs}) == 1 and len({r["tokens"] for r in runs}) == 1
    assert all(0 < r["first_progress_s"] < r["wall_s"] for r in runs)
    assert data["ratios"]["first step: fresh / pool"] > 0


def test_service_runs_the_same_job_every_way(quick_results: tuple[dict[str, Any], str]) -> None:
    data = quick_results[0]["sections"]["service"]["data"]
    runs = data["runs"]
    assert {r["mode"] for r in runs} == {"grpc_1", "grpc_100", "fresh", "warm"}
    assert len({r["steps"] for r in runs}) == 1 and len({r["tokens"] for r in runs}) == 1
    grpc_runs = [r for r in runs if r["mode"].startswith("grpc")]
    assert all(r["watchers_complete"] and r["events"] > r["steps"] for r in grpc_runs)
    assert data["worker_import_s"] > 0


def test_rpc_levels_answered_without_errors(quick_results: tuple[dict[str, Any], str]) -> None:
    table = quick_results[0]["sections"]["rpc"]["data"]["table"]
    for rpc_name in ("ValidateConfig", "GetJob"):
        assert [row["clients"] for row in table[rpc_name]] == [1, 5]
        for row in table[rpc_name]:
            assert row["requests"] > 0 and row["errors"] == 0
            assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
            assert row["server_cpu_ms"] > 0 and row["client_cpu_ms"] > 0
    limit = quick_results[0]["sections"]["rpc"]["data"]["limit"]
    assert limit["clients"] == 5 and limit["answers_per_s_needed"] == pytest.approx(5 / 0.025)
    for rpc_name in ("ValidateConfig", "GetJob"):
        row = limit[rpc_name]
        cpu_ms = row["server_cpu_ms"] + row["client_cpu_ms"]
        bound = min(limit["cores"] * 1000 / cpu_ms, 1000 / row["server_cpu_ms"])  # the cores, or one server process
        assert row["answers_per_s_possible"] == pytest.approx(bound)
    assert "What limits it:" in quick_results[1]


def test_memory_compares_a_measured_peak_with_the_estimate(quick_results: tuple[dict[str, Any], str]) -> None:
    (case,) = quick_results[0]["sections"]["memory"]["data"]["cases"]
    assert case["measured_delta_bytes"] > 0 and case["estimated_delta_bytes"] > 0
    expected = case["measured_delta_bytes"] / case["estimated_delta_bytes"]
    assert case["measured_over_estimated"] == pytest.approx(expected)


def test_data_encodes_the_same_rows_every_way_and_warm_jobs_hit(quick_results: tuple[dict[str, Any], str]) -> None:
    data = quick_results[0]["sections"]["data"]["data"]
    runs = data["encode"]["runs"]
    assert set(runs) == {"ours", "ours_from_file", "bare", "datasets_map"}
    assert {r["rows"] for rs in runs.values() for r in rs} == {data["rows"]["encode"]}, "every way, the same rows"
    assert len({r["tokens"] for rs in runs.values() for r in rs}) == 1, "every way counts the same tokens"
    assert all(r["tokens_per_s"] > 0 for rs in runs.values() for r in rs)
    jobs = data["jobs"]
    assert [name for name, job in jobs.items() if job["hit"]] == ["small_warm", "big_warm"]
    assert all(job["to_first_step_s"] > 0 and job["peak_rss_bytes"] > 0 for job in jobs.values())


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU may be present here")
def test_gpu_script_fails_clearly_without_cuda() -> None:
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh")], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2
    assert "GPU" in proc.stderr or "CUDA" in proc.stderr
    direct = subprocess.run(
        [sys.executable, "-m", "bench.gpu"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert direct.returncode == 2 and "needs a CUDA GPU" in direct.stderr


def test_a_merged_run_keeps_the_other_sections_and_says_when_each_ran(
    quick_results: tuple[dict[str, Any], str],
) -> None:
    from bench.__main__ import merge_base
    from bench.report import render

    earlier = quick_results[0]
    base = merge_base(earlier)
    assert base["sections"] == earlier["sections"]
    assert set(base["section_started_at"].values()) == {earlier["started_at"]}
    assert "rerun later" not in render(base)
    base["section_started_at"]["memory"] = "2099-01-01T00:00:00+00:00"  # what _run_all stamps on a rerun section
    assert "Sections rerun later (`--merge`): memory at 2099-01-01T00:00:00+00:00." in render(base)
    assert merge_base(base)["section_started_at"] == base["section_started_at"]  # a second merge keeps the stamps
