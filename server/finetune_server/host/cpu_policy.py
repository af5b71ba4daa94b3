"""How many CPU threads a worker uses, and on which CPUs: training must not fight the server for cores.

torch's OpenMP team spins while it waits for its slowest thread. When the team is as wide as the machine and the
server (RPCs, event persistence) or anything else needs a core, each parallel region waits for a thread that is not
running. On this project's 2-core machine, 50 clients calling the server made training 12.5x slower with torch's
default of 2 threads, and 1.5x slower with 1 (the load soak, tests/soak/test_load.py). So by default a worker gets the
cores left after one for the server, shared by the slots, and `--worker-cpus` can pin workers to cores of their own.
This module never imports torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from finetune_server.host.cgroups import cgroup_files

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by torch's and MKL's pools when they start


def available_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask; all of them where the platform has no masks)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6], as taskset and cgroups write CPU lists. ValueError on anything else."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            low, high = int(first), int(last) if dash else int(first)
        except ValueError:
            raise ValueError(f"not a CPU list: {text!r} (expected e.g. 0-3,6)") from None
        if low < 0 or high < low:
            raise ValueError(f"not a CPU range: {part!r}")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError("the CPU list is empty")
    return sorted(cpus)


def usable_cpus() -> list[int]:
    """Every CPU a process of ours may be pinned to, whatever this one's own mask: our cgroup's cpuset, else all."""
    files = [
        *cgroup_files("cpuset.cpus.effective", "cpuset", "cpuset.effective_cpus"),
        *cgroup_files("cpuset.cpus", "cpuset", "cpuset.cpus"),
        Path("/sys/devices/system/cpu/online"),
    ]
    for path in files:
        try:
            return parse_cpu_list(path.read_text())
        except (OSError, ValueError):  # absent, or empty (a v2 cpuset that does not restrict)
            continue
    return list(range(os.cpu_count() or 1))


def worker_threads(threads: int, cpus: list[int], slots: int) -> int:
    """Threads per worker: `threads` when set; else the pinned CPUs, or all but one (the server's), per slot."""
    if threads > 0:
        return threads
    if cpus:
        return max(1, len(cpus) // slots)
    return max(1, (len(available_cpus()) - 1) // slots)


def check_cpus(cpus: list[int]) -> None:
    """ValueError when a requested CPU is not one a worker could be pinned to (its sched_setaffinity would fail)."""
    if not cpus:  # nothing pinned: no cgroup files to read at start-up
        return
    usable = usable_cpus()
    missing = sorted(set(cpus) - set(usable))
    if missing:
        raise ValueError(f"CPUs {missing} are not available here (available: {format_cpu_list(usable)})")


def apply_in_worker(threads: int | None, cpus: list[int] | None) -> None:
    """In a worker, before its first computation: pin to `cpus` and size the thread pools to `threads`. The pools read
    the variables when torch loads; a worker forked from a warm pool has torch loaded already, so it is told too."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    if threads:
        for name in THREAD_VARIABLES:
            os.environ[name] = str(threads)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(threads)


def format_cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 3, 6] -> '0-3,6' (the inverse of parse_cpu_list)."""
    ranges: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def cpu_set_note() -> str:
    """', CPUs 0-3' when this process is pinned to a part of the machine; '' when it may use every CPU."""
    cpus = available_cpus()
    return "" if len(cpus) == (os.cpu_count() or len(cpus)) else f", CPUs {format_cpu_list(cpus)}"
