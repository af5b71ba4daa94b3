"""A real local Ray cluster for the tests: a head started with `ray start --head --block` (no dashboard, few CPUs,
a small object store, a short temp dir for its sockets), and optionally more nodes on the same host. Each is stopped
by its own process ids."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

START_TIMEOUT_S = 90.0
OBJECT_STORE_BYTES = 80 << 20


@dataclass
class RayNode:
    process: subprocess.Popen[bytes]
    log_path: Path
    descendants: list[psutil.Process] = field(default_factory=list)

    def stop(self) -> None:
        """Kill the node's processes: its `ray start --block` group, then its workers (in groups of their own).

        A test cluster has nothing to drain (SIGTERM would wait up to 30 s for that)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.descendants = psutil.Process(self.process.pid).children(recursive=True)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        for proc in self.descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(self.descendants, timeout=30)


@dataclass
class RayHead(RayNode):
    address: str = ""
    temp_dir: Path = Path()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ray_command() -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats"]


def _env() -> dict[str, str]:
    # The Ray workers import the server's code: give them this test run's import path.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "RAY_USAGE_STATS_ENABLED": "0"}


def start_head(num_cpus: int) -> RayHead:
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # AF_UNIX socket paths must stay short
    log_path = temp_dir / "head.log"
    command = [
        *_ray_command(), "--head", "--port=0", f"--num-cpus={num_cpus}", "--num-gpus=0",
        "--include-dashboard=false", f"--temp-dir={temp_dir}", f"--object-store-memory={OBJECT_STORE_BYTES}",
        # Ports that default to fixed numbers: free ones, so that another cluster on this host does not collide.
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, env=_env(), start_new_session=True)
    address_file = temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (address_file.is_file() and address_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            RayNode(process, log_path).stop()
            raise RuntimeError(f"the Ray head did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)  # polling for the head's address file, under a deadline
    return RayHead(process, log_path, address=address_file.read_text().strip(), temp_dir=temp_dir)


def start_worker_node(head: RayHead, num_cpus: int, *, wrapper: list[str] | None = None) -> RayNode:
    """Another node on this host, joined to `head`; `wrapper` prefixes the command (e.g. a private mount namespace).

    Returns once the head counts it alive."""
    import ray

    log_path = head.temp_dir / f"node-{len(list(head.temp_dir.glob('node-*.log')))}.log"
    before = sum(1 for node in ray.nodes() if node["Alive"])
    command = [*(wrapper or []), *_ray_command(), f"--address={head.address}", f"--num-cpus={num_cpus}"]
    command += ["--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}"]
    command += [f"--dashboard-agent-listen-port={free_port()}"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, env=_env(), start_new_session=True)
    node = RayNode(process, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while sum(1 for n in ray.nodes() if n["Alive"]) <= before:
        if process.poll() is not None or time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"the Ray node did not join:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)  # polling the cluster's node table, under a deadline
    return node
