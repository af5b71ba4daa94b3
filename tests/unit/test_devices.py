"""Device detection without torch, nvidia-smi parsing, library versions and the bitsandbytes probe."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from finetune_server.host import devices as devices_module
from finetune_server.host.devices import (
    PROBE_CACHE_MAX_AGE_S,
    detect_devices,
    library_versions,
    parse_nvidia_smi,
    probe_bitsandbytes_async,
    probe_bitsandbytes_cached,
    probe_cache_path,
    probe_fingerprint,
)

SAMPLE = """0, NVIDIA GeForce RTX 3060, 12288, 11972, 8.6
1, Tesla T4, 15360, 15101, 7.5
2, NVIDIA A100-SXM4-80GB, 81920, 80000, 8.0
garbage line
3, NVIDIA H100 80GB HBM3, [N/A], [N/A], 9.0
"""


def test_parse_nvidia_smi() -> None:
    devices = parse_nvidia_smi(SAMPLE)
    assert [d.name for d in devices] == ["cuda:0", "cuda:1", "cuda:2"]  # malformed lines are skipped
    rtx = devices[0]
    assert rtx.description == "NVIDIA GeForce RTX 3060"
    assert rtx.total_memory_bytes == 12288 * 1024 * 1024
    assert rtx.free_memory_bytes == 11972 * 1024 * 1024
    assert rtx.compute_capability == "8.6"
    assert [d.bf16_supported for d in devices] == [True, False, True]  # Turing (7.5) has no fast bf16


def test_parse_name_with_comma() -> None:
    (device,) = parse_nvidia_smi("0, Odd, Name GPU, 1024, 512, 8.9")
    assert device.description == "Odd, Name GPU"
    assert device.total_memory_bytes == 1024 << 20


def test_cpu_device_is_always_last_and_plausible() -> None:
    devices = detect_devices(max_age_s=0)
    cpu = devices[-1]
    assert cpu.name == "cpu"
    assert cpu.total_memory_bytes == psutil.virtual_memory().total
    assert 0 < cpu.free_memory_bytes <= cpu.total_memory_bytes
    assert cpu.bf16_supported is False
    assert cpu.compute_capability == ""
    assert all(d.name.startswith("cuda:") for d in devices[:-1])


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `nvidia-smi` first on PATH that prints SAMPLE and adds a line to the returned file each time it runs;
    the device cache starts empty and gets its real contents back afterwards."""
    (tmp_path / "sample.csv").write_text(SAMPLE)
    runs = tmp_path / "runs"
    runs.touch()
    binary = tmp_path / "nvidia-smi"
    binary.write_text(f"#!/bin/sh\necho run >> '{runs}'\ncat '{tmp_path / 'sample.csv'}'\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices_module._Cache, "devices", None)
    return runs


def test_detection_is_cached_and_returns_copies(fake_nvidia_smi: Path) -> None:
    def nvidia_smi_runs() -> int:
        return len(fake_nvidia_smi.read_text().splitlines())

    first = detect_devices(max_age_s=60)
    assert [d.name for d in first] == ["cuda:0", "cuda:1", "cuda:2", "cpu"]
    assert nvidia_smi_runs() == 1
    first[0].free_memory_bytes = -1  # a caller altering its list must not alter the cache
    first[-1].total_memory_bytes = -1
    again = detect_devices(max_age_s=60)
    assert nvidia_smi_runs() == 1, "a fresh cache answers without running nvidia-smi again"
    assert again[0].free_memory_bytes == 11972 << 20
    assert again[-1].total_memory_bytes == psutil.virtual_memory().total
    detect_devices(max_age_s=0)
    assert nvidia_smi_runs() == 2, "an expired cache runs nvidia-smi again"


def test_detection_does_not_import_torch() -> None:
    code = (
        "import sys; from finetune_server.host.devices import detect_devices, library_versions; "
        "detect_devices(); library_versions(); "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'datasets') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_library_versions() -> None:
    versions = library_versions()
    import torch  # test-only: compare with the real import

    assert versions["torch"] == torch.__version__
    assert versions["peft"].startswith("0.21")
    assert "sage-finetune" in versions
    assert all(v for v in versions.values())


@pytest.mark.slow
def test_bitsandbytes_probe_works_here() -> None:
    # bitsandbytes 0.50 runs 4-bit and 8-bit layers on this CPU; the probe takes ~3 s (it imports torch).
    assert asyncio.run(probe_bitsandbytes_async(timeout=120)) == (True, "")


def test_bitsandbytes_probe_times_out() -> None:
    works, error = asyncio.run(probe_bitsandbytes_async(timeout=0.05))
    assert not works
    assert "timed out" in error


@pytest.mark.slow
def test_a_successful_probe_is_remembered_for_the_same_host_and_only_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = probe_cache_path()
    assert path == tmp_path / "sage-finetune" / "bitsandbytes-probe.json"
    # A failed probe (here: timed out) is not remembered.
    assert not asyncio.run(probe_bitsandbytes_cached(timeout=0.05))[0]
    assert not path.exists()
    assert asyncio.run(probe_bitsandbytes_cached(timeout=120)) == (True, "")
    assert json.loads(path.read_text())["fingerprint"] == probe_fingerprint()
    # Remembered: answered without the subprocess, which could not finish in 0.05 s (see the test above).
    assert asyncio.run(probe_bitsandbytes_cached(timeout=0.05)) == (True, "")
    # Another torch (or interpreter, or GPU set) on the same host: probed again.
    entry = json.loads(path.read_text())
    entry["fingerprint"]["torch"] = "0.0.1"
    path.write_text(json.dumps(entry))
    works, error = asyncio.run(probe_bitsandbytes_cached(timeout=0.05))
    assert not works and "timed out" in error
    # An old success is probed again too.
    entry["fingerprint"] = probe_fingerprint()
    entry["at"] -= PROBE_CACHE_MAX_AGE_S + 1
    path.write_text(json.dumps(entry))
    assert not asyncio.run(probe_bitsandbytes_cached(timeout=0.05))[0]
