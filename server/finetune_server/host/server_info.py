"""What GetServerInfo reports: devices, versions, limits, and whether bitsandbytes works.

The bitsandbytes probe imports torch, so it runs once in a subprocess in the background at start-up (unless the host
remembers an earlier success); until it has answered, the report says so instead of blocking the RPC.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psutil
import structlog

from finetune_server.host.cpu_policy import format_cpu_list
from finetune_server.host.devices import detect_devices, library_versions, probe_bitsandbytes_cached
from finetune_server.settings import ServerSettings

log = structlog.get_logger(__name__)


def package_version() -> str:
    try:
        return version("sage-finetune")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0+unknown"


@dataclass
class _Probe:
    works: bool = False
    error: str = "bitsandbytes check still running"


class ServerInfoProvider:
    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings
        self._probe = _Probe()
        self._task: asyncio.Task[None] | None = None

    def start_probe(self) -> None:
        """Start the bitsandbytes probe in the background (a subprocess; never blocks the server)."""
        self._task = asyncio.get_running_loop().create_task(self._run_probe())

    async def _run_probe(self) -> None:
        try:
            works, error = await probe_bitsandbytes_cached(timeout=120)
        except Exception as exc:  # a broken probe must not take the server down
            works, error = False, f"probe failed: {exc}"
        self._probe = _Probe(works, error)
        log.info("bitsandbytes.probe", works=works, error=error)

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def describe(self) -> dict[str, Any]:
        devices = await asyncio.to_thread(detect_devices)
        return {
            "version": package_version(),
            "devices": devices,
            "library_versions": library_versions(),
            "bitsandbytes_available": self._probe.works,
            "bitsandbytes_error": "" if self._probe.works else self._probe.error,
            "slots": self._settings.slots,
            "offline": self._settings.offline,
            "hf_endpoint": self._settings.hf_endpoint,
            "max_upload_bytes": self._settings.max_upload_bytes,
            "host_memory_bytes": psutil.virtual_memory().total,
            "cpu_count": os.cpu_count() or 1,
            "worker_threads": self._settings.threads_per_worker,
            "worker_cpus": format_cpu_list(self._settings.worker_cpus),
        }
