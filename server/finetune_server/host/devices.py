"""Training devices, library versions and the bitsandbytes probe, without importing torch in the server process.

GPUs come from `nvidia-smi` (importing torch to ask CUDA costs seconds and would hold a CUDA context in the server);
the CPU from psutil. The bitsandbytes probe imports torch, so it runs in a subprocess; a success is remembered per
host (the user's cache folder), keyed by the interpreter, the library versions and the visible GPUs, so a restart on
an unchanged host does not pay seconds of CPU for it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

log = structlog.get_logger(__name__)

NVIDIA_SMI_QUERY = "index,name,memory.total,memory.free,compute_cap"
NVIDIA_SMI_TIMEOUT_S = 5.0
CACHE_SECONDS = 5.0
PROBE_CACHE_MAX_AGE_S = 7 * 24 * 3600.0
MIB = 1 << 20
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "tokenizers",
    "grpcio",
    "protobuf",
    "sage-finetune",
)


@dataclass
class Device:
    """The contract's Device."""

    name: str = ""
    description: str = ""
    total_memory_bytes: int = 0
    free_memory_bytes: int = 0
    bf16_supported: bool = False
    compute_capability: str = ""


class _Cache:
    lock = threading.Lock()
    at = 0.0
    devices: list[Device] | None = None


def parse_nvidia_smi(output: str) -> list[Device]:
    """Devices from `nvidia-smi --query-gpu=index,name,memory.total,memory.free,compute_cap --format=csv,noheader,
    nounits` (memory in MiB). Malformed lines are skipped: a GPU we cannot read is not a GPU we can train on."""
    devices = []
    for line in output.splitlines():
        raw = line.split(",")
        if len(raw) < 5:
            continue
        # The name may itself contain commas: index first, the three numeric fields last.
        index, total, free, capability = (p.strip() for p in (raw[0], *raw[-3:]))
        name = ",".join(raw[1:-3]).strip()
        try:
            major = int(capability.split(".")[0])
            devices.append(
                Device(
                    name=f"cuda:{int(index)}",
                    description=name,
                    total_memory_bytes=int(float(total) * MIB),
                    free_memory_bytes=int(float(free) * MIB),
                    bf16_supported=major >= 8,
                    compute_capability=capability,
                )
            )
        except ValueError:
            log.warning("unparsable nvidia-smi line", line=line)
    return devices


def _cuda_visible_filter(devices: list[Device]) -> list[Device]:
    """Honour CUDA_VISIBLE_DEVICES given as indices (what a worker would see), renumbering like CUDA does."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return devices
    wanted = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(v.isdigit() for v in wanted):
        return devices  # UUIDs or MIG names: leave the list as nvidia-smi gives it
    by_index = {d.name: d for d in devices}
    out = []
    for new_index, old in enumerate(wanted):
        device = by_index.get(f"cuda:{old}")
        if device is not None:
            out.append(Device(**{**device.__dict__, "name": f"cuda:{new_index}"}))
    return out


def _gpus() -> list[Device]:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        result = subprocess.run(
            [binary, f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi failed", error=str(exc))
        return []
    if result.returncode != 0:
        log.warning("nvidia-smi failed", returncode=result.returncode, stderr=result.stderr.strip()[:500])
        return []
    return _cuda_visible_filter(parse_nvidia_smi(result.stdout))


def cpu_device() -> Device:
    memory = psutil.virtual_memory()
    return Device(
        name="cpu",
        description=f"CPU, {psutil.cpu_count(logical=True) or 0} logical cores",
        total_memory_bytes=int(memory.total),
        free_memory_bytes=int(memory.available),
        bf16_supported=False,  # bf16 on the CPU is ~58x slower than fp32 here: not usable for training
        compute_capability="",
    )


def detect_devices(*, max_age_s: float = CACHE_SECONDS) -> list[Device]:
    """CUDA GPUs (via nvidia-smi) then the CPU. Cached for `max_age_s` so GetServerInfo/ValidateConfig stay cheap."""
    with _Cache.lock:
        now = time.monotonic()
        if _Cache.devices is None or now - _Cache.at >= max_age_s:
            _Cache.devices, _Cache.at = [*_gpus(), cpu_device()], now
        return [Device(**d.__dict__) for d in _Cache.devices]  # copies: callers may not alter the cache


def count_gpus(devices: list[Device]) -> int:
    """How many of `devices` (as `detect_devices` lists them) are CUDA GPUs."""
    return sum(1 for d in devices if d.name.startswith("cuda"))


def library_versions() -> dict[str, str]:
    """Installed versions by distribution name, read from package metadata without importing the libraries."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# Runs in a child: a 4-bit (NF4) and an 8-bit bitsandbytes Linear forward on the default device (CUDA when present).
PROBE_SCRIPT = """
import torch, bitsandbytes as bnb
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32
x = torch.randn(2, 64, dtype=dtype)
l4 = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=dtype, quant_type="nf4").to(device)
l8 = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False).to(device)
for layer in (l4, l8):
    y = layer(x.to(device))
    assert y.shape == (2, 32) and torch.isfinite(y.float()).all(), type(layer).__name__
print("ok", device)
"""


def _probe_result(returncode: int | None, stdout: str, stderr: str) -> tuple[bool, str]:
    if returncode == 0 and stdout.strip().startswith("ok"):
        return True, ""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return False, (lines[-1] if lines else f"probe exited with {returncode}")[:1000]


async def probe_bitsandbytes_async(timeout: float = 120.0) -> tuple[bool, str]:  # noqa: ASYNC109 - kills the child
    """(works, error text): whether bitsandbytes 4-bit and 8-bit layers run here. Takes seconds (the child imports
    torch), without blocking the event loop: the server runs it in the background at start."""
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PROBE_SCRIPT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        return False, f"bitsandbytes probe could not start: {exc}"
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return False, f"bitsandbytes probe timed out after {timeout:.0f} s"
    works, error = _probe_result(process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))
    log.info("bitsandbytes probe", works=works, error=error)
    return works, error


def probe_cache_path() -> Path:
    """Where a successful probe is remembered: `$XDG_CACHE_HOME` (default ~/.cache)/sage-finetune."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "sage-finetune" / "bitsandbytes-probe.json"


def probe_fingerprint() -> dict[str, Any]:
    """What the probe's answer depends on: the interpreter, torch's and bitsandbytes' versions, the visible GPUs."""
    versions = library_versions()
    gpus = [d for d in detect_devices() if d.name != "cpu"]
    return {
        "python": sys.executable,
        "torch": versions.get("torch", ""),
        "bitsandbytes": versions.get("bitsandbytes", ""),
        "gpus": [[d.name, d.description, d.compute_capability, d.total_memory_bytes] for d in gpus],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def _remembered(path: Path, fingerprint: dict[str, Any]) -> bool:
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    # Only successes are written, so an entry that matches and is fresh means "works".
    fresh = isinstance(entry, dict) and time.time() - float(entry.get("at", 0)) < PROBE_CACHE_MAX_AGE_S
    return bool(fresh and entry.get("fingerprint") == fingerprint)


def _remember(path: Path, fingerprint: dict[str, Any]) -> None:
    """Best effort (an unwritable home only costs the next start a probe); whole or not at all."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch.write_text(json.dumps({"fingerprint": fingerprint, "at": time.time()}))
        os.replace(scratch, path)
    except OSError as exc:
        log.info("bitsandbytes probe not remembered", path=str(path), error=str(exc))
        with contextlib.suppress(OSError):
            scratch.unlink()


async def probe_bitsandbytes_cached(timeout: float = 120.0) -> tuple[bool, str]:  # noqa: ASYNC109 - the probe's
    """`probe_bitsandbytes_async`, answered from the host's cache when an earlier probe with the same fingerprint
    succeeded. Failures are not remembered: the next start probes again."""
    path = probe_cache_path()
    fingerprint = await asyncio.to_thread(probe_fingerprint)
    if await asyncio.to_thread(_remembered, path, fingerprint):
        log.info("bitsandbytes probe", works=True, remembered=str(path))
        return True, ""
    works, error = await probe_bitsandbytes_async(timeout)
    if works:
        await asyncio.to_thread(_remember, path, fingerprint)
    return works, error
