"""The CLI's live view reads the stream in a helper thread, so Ctrl-C never lands inside gRPC's own locking."""

from __future__ import annotations

import io
import signal
import threading
from collections.abc import Iterator
from typing import Any, cast

import grpc
import pytest
from rich.console import Console

from finetune_client import FinetuneServiceError, GrpcFineTuneService
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.cli.progress import follow

JOB = pb.Job(id="job-1", state=pb.JOB_STATE_RUNNING)


class JobSource:
    """The one client method `follow` calls after the stream: the job as the server stores it."""

    def __init__(self) -> None:
        self.asked_in: list[threading.Thread] = []

    def get_job(self, job_id: str) -> pb.Job:
        self.asked_in.append(threading.current_thread())
        return pb.Job(id=job_id, state=pb.JOB_STATE_SUCCEEDED)


def progress_events(read_in: list[threading.Thread], steps: int) -> Iterator[pb.JobEvent]:
    for step in range(1, steps + 1):
        read_in.append(threading.current_thread())
        yield pb.JobEvent(sequence=step, progress=pb.TrainingProgress(step=step, total_steps=steps, loss=1.0 / step))


def run_follow(events: Any, source: JobSource | None = None) -> tuple[pb.Job, str]:
    out = io.StringIO()
    service = cast(GrpcFineTuneService, source or JobSource())
    job = follow(service, JOB, events, Console(file=out, width=120))
    return job, out.getvalue()


def test_the_stream_and_the_final_job_are_read_off_the_callers_thread() -> None:
    read_in: list[threading.Thread] = []
    source = JobSource()
    job, shown = run_follow(progress_events(read_in, 5), source)
    assert job.state == pb.JOB_STATE_SUCCEEDED, "the job as get_job returned it after the stream ended"
    assert len(read_in) == 5 and threading.current_thread() not in read_in + source.asked_in
    assert "step 5/5" in shown


def test_an_error_of_the_stream_is_raised_in_the_caller() -> None:
    def failing() -> Iterator[pb.JobEvent]:
        yield pb.JobEvent(sequence=1, progress=pb.TrainingProgress(step=1, total_steps=3))
        raise FinetuneServiceError(grpc.StatusCode.UNAVAILABLE, "gone")

    with pytest.raises(FinetuneServiceError, match="gone"):
        run_follow(failing())


def test_ctrl_c_while_the_stream_is_silent_interrupts_the_caller() -> None:
    reading = threading.Event()
    never = threading.Event()

    def silent() -> Iterator[pb.JobEvent]:
        reading.set()
        never.wait()  # a stream with nothing to say (a queued job)
        yield from ()

    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main

    def interrupt() -> None:
        reading.wait(10)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_follow(silent())
    never.set()
