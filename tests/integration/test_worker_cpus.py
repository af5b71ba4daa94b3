"""Workers run with the CPU threads and CPUs the server gives them, as the job's own log says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.host.cpu_policy import available_cpus

from .conftest import RunningServer, start_server, stop_server
from .test_jobs import job_config, train_to_end


def start_line(events: list[pb.JobEvent]) -> str:
    return next(e.log.message for e in events if "CPU thread" in e.log.message)


def test_by_default_a_worker_leaves_one_core_to_the_server(server: RunningServer, tiny_model_dir: Path) -> None:
    channel, stub = server.stub()
    try:
        _, events = train_to_end(stub, job_config(tiny_model_dir.name, max_steps=1))
    finally:
        channel.close()
    assert events[-1].state_change.current == pb.JOB_STATE_SUCCEEDED
    threads = max(1, len(available_cpus()) - 1)
    assert f"with {threads} CPU thread{'' if threads == 1 else 's'}" in start_line(events)


@pytest.mark.slow
def test_workers_are_pinned_to_the_cpus_they_are_given(
    tmp_path: Path, server_roots: tuple[Path, Path], tiny_model_dir: Path
) -> None:
    cpu = available_cpus()[-1]
    server = start_server(tmp_path, *server_roots, "--worker-threads", "1", "--worker-cpus", str(cpu))
    channel, stub = server.stub()
    try:
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        _, events = train_to_end(stub, job_config(tiny_model_dir.name, max_steps=1))
    finally:
        channel.close()
        stop_server(server)
    assert (info.worker_threads, info.worker_cpus) == (1, str(cpu))  # what the server says it does...
    assert events[-1].state_change.current == pb.JOB_STATE_SUCCEEDED
    line = start_line(events)  # ...and what the worker did
    assert "with 1 CPU thread" in line
    if (os.cpu_count() or 1) > 1:
        assert line.endswith(f", CPUs {cpu}")
