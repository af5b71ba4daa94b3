"""Where this process's cgroup files are (v2 unified or v1 per controller), for limits the kernel enforces on us."""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_files(v2_file: str, v1_controller: str, v1_file: str) -> list[Path]:
    """Candidate paths of one cgroup file for this process, v2 first; [] where /proc/self/cgroup is unreadable."""
    try:
        entries = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    candidates: list[Path] = []
    for entry in entries:
        _, controllers, path = entry.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":
            candidates.insert(0, CGROUP_ROOT / rel / v2_file)
        elif v1_controller in controllers.split(","):
            candidates.append(CGROUP_ROOT / v1_controller / rel / v1_file)
    return candidates
