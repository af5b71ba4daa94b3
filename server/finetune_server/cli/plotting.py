"""`finetune jobs show --plot`: the loss curve of a job, from its stored progress and eval events.

Drawn by the service's own PNG plotter (`render_loss_curve`), the same chart the server writes into the job's report,
so the CLI needs no plotting library.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from pathlib import Path

from finetune_client import GrpcFineTuneService
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.cli.common import EXIT_FAILED, CliError
from finetune_server.observability.loss_plot import render_loss_curve

Points = list[tuple[float, float]]


def loss_points(service: GrpcFineTuneService, job: pb.Job) -> tuple[Points, Points]:
    """(train, eval) points as (step, loss), from the job's events up to the newest one stored now.

    A running job's stream would follow it to its end, so the read stops at `job.last_sequence`. A step reported
    twice (a job resumed from a checkpoint re-trains the steps after it) keeps its latest value.
    """
    train: dict[float, float] = {}
    evals: dict[float, float] = {}
    if job.last_sequence == 0:
        return [], []
    events = service.watch(job.id, 0)
    try:
        for event in events:
            kind = event.WhichOneof("kind")
            if kind == "progress":
                train[float(event.progress.step)] = event.progress.loss
            elif kind == "eval" and math.isfinite(event.eval.eval_loss):  # NaN: an evaluation of probes only
                evals[float(event.eval.step)] = event.eval.eval_loss
            if event.sequence >= job.last_sequence:
                break
    finally:
        if isinstance(events, Generator):
            events.close()  # ends the stream now rather than when the generator is collected
    return sorted(train.items()), sorted(evals.items())


def write_loss_curve(service: GrpcFineTuneService, job: pb.Job, path: Path) -> str:
    """Write the PNG to `path`; returns what to tell the user. A job without progress yet has nothing to plot."""
    train, evals = loss_points(service, job)
    if not train and not evals:
        raise CliError(f"job {job.id} has no training progress yet; nothing to plot", EXIT_FAILED)
    try:
        path.write_bytes(render_loss_curve(train, evals))
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return f"loss curve written to {path} ({len(train)} train points, {len(evals)} eval points)"
