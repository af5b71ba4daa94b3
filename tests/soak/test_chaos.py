"""Chaos: SIGKILL the server 3 times and a worker's process group 3 times at seeded random points of real jobs.

Kill points are event counts (the k-th event of a job), never sleeps, so a seed replays the same plan. After every
server kill the server is restarted on the same data dir. In the end every job is SUCCEEDED with the planned steps or
FAILED with a reason; no job is lost; SQLite is intact; every checkpoint folder is complete; every job's event
sequence is gap-free; no worker outlives the server.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.storage.layout import CHECKPOINT_COMPLETE_MARKER as COMPLETE_MARKER
from finetune_server.storage.layout import CHECKPOINTS_DIR

from ..integration.test_jobs import job_config, states_of
from .conftest import RunningServer, integrity_check, machine, start_server, stop_server, write_report_section

pytestmark = [pytest.mark.soak, pytest.mark.timeout(1800)]

SEED = int(os.environ.get("CHAOS_SEED", "20261128"))
JOBS = 6
STEPS = 40
SAVE_STEPS = 5
SERVER_KILLS = 3
WORKER_KILLS = 3
MAX_FAULTS_PER_JOB = 2
EXPECTED_EVENTS = STEPS + STEPS // SAVE_STEPS + 6  # states, logs, progress per step, checkpoints, result
FINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


@dataclass
class Fault:
    kind: str  # "server" | "worker"
    job: int  # index into the submitted jobs
    at_sequence: int  # fires at the first event of that job with this sequence number or later
    fired_at: int = 0  # the sequence it fired at
    event_kind: str = ""
    step: int = 0  # the job's last reported step when it fired
    t_s: float = 0.0  # since the start of the run
    restart_s: float = 0.0  # server kills: kill -> listening again
    recovered_s: float = 0.0  # kill -> the job's next progress event (0: the job made none after)
    carried: int = 0  # times it moved to a later job because its job ended first


@dataclass
class Chaos:
    tmp: Path
    roots: tuple[Path, Path]
    server: RunningServer
    started: float = field(default_factory=time.perf_counter)
    restarts: int = 0
    worker_pids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.channel, self.stub = self.server.stub()

    def kill_server(self) -> float:
        """SIGKILL the server, keep its log, restart it on the same data dir; returns the restart time."""
        self.channel.close()
        self.server.process.send_signal(signal.SIGKILL)
        self.server.process.wait(timeout=30)
        self.restarts += 1
        self.server.log_path.rename(self.server.log_path.with_name(f"server-{self.restarts}.log"))
        t0 = time.perf_counter()
        self.server = start_server(self.tmp, *self.roots)
        self.channel, self.stub = self.server.stub()
        return time.perf_counter() - t0

    def kill_worker(self, job_id: str) -> bool:
        """SIGKILL the job's worker process group; False when no worker is running right now."""
        pid_file = self.server.data_dir / "jobs" / job_id / "worker.pid"
        try:
            pid = int(pid_file.read_text().strip())
            os.killpg(pid, signal.SIGKILL)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False
        self.worker_pids.add(pid)
        return True


def plan_faults(rng: random.Random) -> list[Fault]:
    kinds = ["server"] * SERVER_KILLS + ["worker"] * WORKER_KILLS
    rng.shuffle(kinds)
    per_job = dict.fromkeys(range(JOBS), 0)
    faults = []
    for kind in kinds:
        job = rng.choice([j for j, n in per_job.items() if n < MAX_FAULTS_PER_JOB])
        per_job[job] += 1
        faults.append(Fault(kind, job, rng.randint(2, EXPECTED_EVENTS)))
    faults.sort(key=lambda f: (f.job, f.at_sequence))
    return faults


def submit(stub: pb_grpc.FineTuneServiceStub, model: str, index: int) -> str:
    stream = stub.Train(
        pb.TrainRequest(
            config=job_config(model, max_steps=STEPS, save_steps=SAVE_STEPS, logging_steps=1, seed=index + 1),
            request_id=f"chaos-{SEED}-{index}",
            display_name=f"chaos {index}",
        ),
        timeout=60,
    )
    job = next(stream).job
    stream.cancel()  # closing the stream does not cancel the job
    return job.id


def drive(chaos: Chaos, job_id: str, index: int, faults: list[Fault], rng: random.Random) -> list[Fault]:
    """Follow one job to its end, firing its faults at their event counts; returns those left unfired."""
    pending = sorted((f for f in faults if f.job == index), key=lambda f: f.at_sequence)
    last_sequence, last_step = 0, 0
    waiting: list[tuple[Fault, float]] = []  # fired faults waiting for the job's next progress event
    while True:
        stream = chaos.stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_sequence=last_sequence), timeout=600)
        reconnect = False
        for message in stream:
            event = message.event
            assert event.sequence == last_sequence + 1, "WatchJob resumes exactly after the last event seen"
            last_sequence = event.sequence
            kind = event.WhichOneof("kind")
            if kind == "progress":
                last_step = event.progress.step
                for fault, t_kill in waiting:
                    fault.recovered_s = time.perf_counter() - t_kill
                waiting.clear()
            if not pending or event.sequence < pending[0].at_sequence:
                continue
            fault = pending[0]
            if kind == "state_change" and event.state_change.current in FINAL:
                continue  # too late for this job (the stream ends here): carried over below
            t_kill = time.perf_counter()
            if fault.kind == "worker":
                if not chaos.kill_worker(job_id):
                    continue  # no worker right now (starting or exiting): try again at the next event
            else:
                stream.cancel()
                fault.restart_s = chaos.kill_server()
                reconnect = True
            pending.pop(0)
            fault.fired_at, fault.event_kind, fault.step = event.sequence, kind or "", last_step
            fault.t_s = t_kill - chaos.started
            waiting.append((fault, t_kill))
            if reconnect:
                break
        if not reconnect:
            break
    for fault in pending:  # the job ended before these fired: they go to the next job, at a fresh random point
        fault.carried += 1
        fault.job = index + 1
        fault.at_sequence = rng.randint(2, EXPECTED_EVENTS)
    return pending


def all_events(stub: pb_grpc.FineTuneServiceStub, job_id: str) -> list[pb.JobEvent]:
    return [m.event for m in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=60)]


def checkpoint_folders(data_dir: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(complete step-* folders, step-* folders without their marker, leftover staging folders) of every job."""
    complete, half, staging = [], [], []
    for folder in sorted((data_dir / "jobs").glob(f"*/{CHECKPOINTS_DIR}/*")):
        if folder.name.startswith("step-"):
            (complete if (folder / COMPLETE_MARKER).is_file() else half).append(folder)
        elif folder.name.startswith(".tmp-"):
            staging.append(folder)
    return complete, half, staging


def test_chaos_kills_lose_no_job_no_event_and_no_checkpoint(
    tmp_path: Path, server_roots: tuple[Path, Path], tiny_model_dir: Path
) -> None:
    load_at_start = os.getloadavg()[0]
    rng = random.Random(SEED)
    faults = plan_faults(rng)
    planned = ", ".join(f"{f.kind} on job {f.job + 1} at event {f.at_sequence}" for f in faults)
    chaos = Chaos(tmp_path, server_roots, start_server(tmp_path, *server_roots))
    job_ids = [submit(chaos.stub, tiny_model_dir.name, i) for i in range(JOBS)]
    try:
        index = 0
        carried: list[Fault] = []
        while index < len(job_ids):
            carried = drive(chaos, job_ids[index], index, faults, rng)
            index += 1
            if carried and index == len(job_ids):  # faults left and no job to fire them: one more job
                job_ids.append(submit(chaos.stub, tiny_model_dir.name, index))
        wall_s = time.perf_counter() - chaos.started
        jobs = [chaos.stub.GetJob(pb.GetJobRequest(job_id=j), timeout=10).job for j in job_ids]
        events = {j: all_events(chaos.stub, j) for j in job_ids}
        listed = {j.id for j in chaos.stub.ListJobs(pb.ListJobsRequest(page_size=100), timeout=10).jobs}
    finally:
        chaos.channel.close()
        stop_server(chaos.server)

    fired = [f for f in faults if f.fired_at]
    assert sum(f.kind == "server" for f in fired) == SERVER_KILLS
    assert sum(f.kind == "worker" for f in fired) == WORKER_KILLS

    lost = [j for j in job_ids if j not in listed]
    lost += [job.id for job in jobs if job.state not in FINAL]
    succeeded = [job for job in jobs if job.state == pb.JOB_STATE_SUCCEEDED]
    failed = [job for job in jobs if job.state == pb.JOB_STATE_FAILED]
    for job in jobs:
        job_events = events[job.id]
        assert [e.sequence for e in job_events] == list(range(1, len(job_events) + 1)), f"{job.id}: gap in events"
        assert job.last_sequence == len(job_events)
        states = states_of(job_events)
        assert states[0] == pb.JOB_STATE_QUEUED and states[-1] == job.state, f"{job.id}: {states}"
        if job.state == pb.JOB_STATE_SUCCEEDED:
            progress = [e.progress.step for e in job_events if e.WhichOneof("kind") == "progress"]
            assert job.result.steps == STEPS and progress[-1] == STEPS, job.id
        else:
            assert job.state == pb.JOB_STATE_FAILED and job.error.reason and job.error.message, job
    assert lost == []

    integrity = integrity_check(chaos.server.data_dir)
    assert integrity == [("ok",)]
    complete, half, staging = checkpoint_folders(chaos.server.data_dir)
    assert half == [], "a checkpoint folder without its complete marker"
    assert complete, "the jobs wrote checkpoints"
    succeeded_ids = {job.id for job in succeeded}
    assert not [s for s in staging if s.parent.parent.name in succeeded_ids], "a finished job left staging folders"
    orphans = [pid for pid in chaos.worker_pids if _alive(pid)]
    assert orphans == [], "a killed worker is still running"

    resumes = sum(job.resume_count for job in jobs)
    rows = "\n".join(
        f"| {i + 1} | {f.kind} | job {f.job + 1} | {f.at_sequence} | {f.fired_at} ({f.event_kind}) | {f.step} "
        f"| {f.t_s:.1f} | {f'{f.restart_s:.1f}' if f.kind == 'server' else '-'} | {f.recovered_s:.1f} | {f.carried} |"
        for i, f in enumerate(sorted(fired, key=lambda f: f.t_s))
    )
    failed_lines = "".join(f"\n- FAILED {job.id}: {job.error.reason}: {job.error.message[:160]}" for job in failed)
    write_report_section(
        "chaos",
        f"""## Chaos: SIGKILL of the server and of worker process groups (tests/soak/test_chaos.py)

Seed {SEED} (`CHAOS_SEED`), {machine(load_at_start)}. Plan: {planned}.

| figure | value |
|---|---|
| jobs (cases) | {len(job_ids)} x {STEPS} steps, checkpoint every {SAVE_STEPS} |
| faults injected | {len(fired)}: {SERVER_KILLS} server SIGKILL + restart, {WORKER_KILLS} worker process-group SIGKILL |
| jobs lost | {len(lost)} |
| jobs SUCCEEDED with {STEPS} steps / FAILED with a reason | {len(succeeded)} / {len(failed)} |
| resumes from a checkpoint (sum of resume_count) | {resumes} |
| SQLite `PRAGMA integrity_check` | {integrity[0][0]} |
| checkpoint folders complete / half-written / staging left | {len(complete)} / {len(half)} / {len(staging)} |
| events checked gap-free | {sum(len(e) for e in events.values())} in {len(events)} jobs |
| killed workers still alive afterwards | {len(orphans)} |
| wall time of the run | {wall_s:.1f} s |

| # | fault | target | planned at | fired at (event) | step | t (s) | restart (s) | to progress (s) | carried |
|---|---|---|---|---|---|---|---|---|---|
{rows}
{failed_lines}
""",
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
