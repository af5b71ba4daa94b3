"""The `finetune` command: `serve` runs the server, `demo` shows the whole service on an embedded default, and the
other commands drive a server (`--server`, or FINETUNE_SERVER): validate, train, watch, jobs, cancel, chat, export,
artifacts, upload, datasets, presets, recommend.

Exit codes: 0 ok; 1 a failed or invalid result (an invalid config, a failed or cancelled job, a refused upload);
2 a usage error or a server that cannot be reached; 130 when Ctrl-C detached from a job (which keeps running).
Only typer is imported up front: the client, rich tables and (for serve/demo) torch load inside the commands that need
them, so `finetune --help` stays fast.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from finetune_server.cli.options import (
    ConfigArgument,
    JobArgument,
    JsonOption,
    LabelOption,
    Remote,
    SetOption,
    connects,
)
from finetune_server.host.cpu_policy import parse_cpu_list
from finetune_server.settings import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_TOKEN_CACHE_MAX_BYTES,
    RaySettings,
    ServerSettings,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune causal language models with LoRA.",
)
jobs_app = typer.Typer(no_args_is_help=True, help="List, inspect and delete training jobs.")
app.add_typer(jobs_app, name="jobs")
datasets_app = typer.Typer(no_args_is_help=True, help="List, inspect and delete uploaded datasets.")
app.add_typer(datasets_app, name="datasets")
artifacts_app = typer.Typer(no_args_is_help=True, help="List, inspect and delete exported artifacts.")
app.add_typer(artifacts_app, name="artifacts")


class JobStateName(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class ExecutorName(StrEnum):
    local = "local"
    ray = "ray"


class ExportFormatName(StrEnum):
    adapter = "adapter"
    merged = "merged"


@app.callback()
def _root() -> None:
    """sage-finetune: a gRPC fine-tuning service and its command line."""


# ----------------------------------------------------------------------------------------------------------------------
# serving and the demo
# ----------------------------------------------------------------------------------------------------------------------


KeepaliveTimeOption = Annotated[
    float, typer.Option(min=0.001, help="Seconds of silence after which the server pings a connection.")
]
KeepaliveTimeoutOption = Annotated[
    float, typer.Option(min=0.001, help="Seconds an unanswered keepalive ping takes to close the connection.")
]
MinPingIntervalOption = Annotated[
    float, typer.Option(min=0.001, help="Shortest interval at which clients may ping; faster ones get GOAWAY.")
]
RayAddressOption = Annotated[
    str, typer.Option(help="With --executor ray: the cluster's head, host:port, or auto (RAY_ADDRESS, or this host's).")
]
RayNamespaceOption = Annotated[str, typer.Option(help="With --executor ray: the namespace of the job actors.")]
RayGpusOption = Annotated[int, typer.Option(min=0, help="With --executor ray: GPUs each job's actor asks for.")]
RayCpusOption = Annotated[float, typer.Option(min=0.01, help="With --executor ray: CPUs each job's actor asks for.")]
RayWorkersOption = Annotated[
    int,
    typer.Option(
        min=1,
        help="With --executor ray: Ray Train workers per job (DDP; each asks for the GPUs and CPUs above).",
    ),
]


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one (printed on stdout).")] = 50051,
    data_dir: Annotated[Path, typer.Option(help="Where jobs, uploads and artifacts live.")] = Path("./data"),
    model_dir: Annotated[
        list[Path] | None, typer.Option(help="A folder under which local models may be named (repeatable).")
    ] = None,
    dataset_dir: Annotated[
        list[Path] | None, typer.Option(help="A folder under which server-side datasets may be named (repeatable).")
    ] = None,
    offline: Annotated[bool, typer.Option(help="Never download from the hub (also HF_HUB_OFFLINE=1).")] = False,
    hf_cache_dir: Annotated[Path | None, typer.Option(help="Hub cache folder (default: huggingface_hub's).")] = None,
    allow_hub_datasets: Annotated[
        bool, typer.Option(help="Let configs name hub datasets (`org/name`); off: local and uploaded datasets only.")
    ] = True,
    slots: Annotated[int, typer.Option(min=1, help="Jobs that may train at once.")] = 1,
    max_upload_bytes: Annotated[int, typer.Option(min=1, help="Largest dataset upload.")] = DEFAULT_MAX_UPLOAD_BYTES,
    max_queued_jobs: Annotated[int, typer.Option(min=1, help="Queued jobs beyond which Train is refused.")] = 1000,
    max_streams_per_connection: Annotated[
        int, typer.Option(min=1, help="Concurrent calls one connection may have open; more wait for a free one.")
    ] = 256,
    disk_reserve_bytes: Annotated[
        int, typer.Option(min=0, help="Disk space kept free beyond what a job or an export needs.")
    ] = 512 << 20,
    token_cache_max_gib: Annotated[
        float,
        typer.Option(min=0, help="Size cap of the tokenized datasets under the data dir (least recently used go)."),
    ] = DEFAULT_TOKEN_CACHE_MAX_BYTES / (1 << 30),
    auth_token_file: Annotated[
        Path | None, typer.Option(help="Bearer tokens, one per line: TOKEN [NAME] [admin]. Unset: no authentication.")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain; with --tls-key, serve TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="PEM CA that client certificates must chain to (mutual TLS).")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port (0: any free one).")
    ] = None,
    worker_threads: Annotated[
        int,
        typer.Option(
            min=0,
            help="CPU threads per training or export worker (0: the cores left after one for the server, per slot).",
        ),
    ] = 0,
    worker_cpus: Annotated[
        str | None, typer.Option(help="Pin workers to these CPUs, e.g. 2-7 (default: the server's CPUs).")
    ] = None,
    warm_workers: Annotated[
        int,
        typer.Option(
            min=0,
            help="Fork servers kept with torch, transformers and peft imported, so workers start in well under a "
            "second (one per worker environment: a GPU slot, CPU exports); 0: every worker starts fresh (~10 s).",
        ),
    ] = ServerSettings.warm_workers,
    prewarm_workers: Annotated[
        bool, typer.Option(help="Start the training slots' fork servers with the server, not with the first job.")
    ] = ServerSettings.prewarm_workers,
    max_generate_workers: Annotated[
        int, typer.Option(min=1, help="Generate calls answered at once, each by a worker holding its model.")
    ] = ServerSettings.max_generate_workers,
    generate_idle: Annotated[
        float, typer.Option(min=0, help="Seconds an idle generation worker keeps its model for the next request.")
    ] = ServerSettings.generate_idle_s,
    max_new_tokens_limit: Annotated[
        int, typer.Option(min=1, help="Largest max_new_tokens a Generate call may ask for.")
    ] = ServerSettings.max_new_tokens_limit,
    keepalive_time: KeepaliveTimeOption = ServerSettings.keepalive_time_s,
    keepalive_timeout: KeepaliveTimeoutOption = ServerSettings.keepalive_timeout_s,
    keepalive_min_ping_interval: MinPingIntervalOption = ServerSettings.keepalive_min_ping_interval_s,
    store: Annotated[
        str,
        typer.Option(
            envvar="FINETUNE_STORE",
            help="The job store: sqlite:///path/file.db or postgresql://user@host:port/db (password from PGPASSWORD "
            "or ~/.pgpass); default: SQLite in the data dir. Servers sharing a PostgreSQL store share one queue.",
        ),
    ] = "",
    lease_seconds: Annotated[
        float,
        typer.Option(
            min=0.1, help="How long a job's lease lasts unless renewed: a dead server's jobs wait this long to resume."
        ),
    ] = DEFAULT_LEASE_SECONDS,
    executor: Annotated[
        ExecutorName, typer.Option(help="Where jobs run: worker subprocesses here, or actors on a Ray cluster.")
    ] = ExecutorName.local,
    ray_address: RayAddressOption = RaySettings.address,
    ray_namespace: RayNamespaceOption = RaySettings.namespace,
    ray_gpus_per_job: RayGpusOption = RaySettings.gpus_per_job,
    ray_cpus_per_job: RayCpusOption = RaySettings.cpus_per_job,
    ray_workers_per_job: RayWorkersOption = RaySettings.workers_per_job,
    grace: Annotated[float, typer.Option(help="Seconds in-flight calls get on SIGTERM/SIGINT.")] = 10.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the gRPC server until SIGTERM or SIGINT."""
    from finetune_server.storage.store_url import parse_store_url

    try:  # before the server's modules load: a bad URL is a usage error at once
        parse_store_url(store, data_dir)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--store") from None
    _prepare_server_process(log_level)
    try:  # a CPU list that does not parse, or names CPUs this machine lacks (ServerSettings checks that)
        pinned = parse_cpu_list(worker_cpus) if worker_cpus else []
        settings = ServerSettings(
            data_dir=data_dir,
            model_roots=list(model_dir or []),
            dataset_roots=list(dataset_dir or []),
            offline=offline,
            hf_cache_dir=hf_cache_dir,
            allow_hub_datasets=allow_hub_datasets,
            slots=slots,
            max_upload_bytes=max_upload_bytes,
            max_queued_jobs=max_queued_jobs,
            max_streams_per_connection=max_streams_per_connection,
            keepalive_time_s=keepalive_time,
            keepalive_timeout_s=keepalive_timeout,
            keepalive_min_ping_interval_s=keepalive_min_ping_interval,
            disk_reserve_bytes=disk_reserve_bytes,
            token_cache_max_bytes=int(token_cache_max_gib * (1 << 30)),
            auth_token_file=auth_token_file,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            metrics_port=metrics_port,
            worker_threads=worker_threads,
            worker_cpus=pinned,
            store_url=store,
            lease_seconds=lease_seconds,
            executor=executor.value,
            ray=RaySettings(ray_address, ray_namespace, ray_gpus_per_job, ray_cpus_per_job, ray_workers_per_job),
            warm_workers=warm_workers,
            prewarm_workers=prewarm_workers,
            max_generate_workers=max_generate_workers,
            generate_idle_s=generate_idle,
            max_new_tokens_limit=max_new_tokens_limit,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--worker-cpus") from None
    if settings.hf_cache_dir is not None:  # workers inherit it: they reopen hub datasets from this cache
        os.environ["HF_HUB_CACHE"] = str(Path(settings.hf_cache_dir).expanduser().resolve())
    from finetune_server.app import serve as run_server
    from finetune_server.cli import common
    from finetune_server.storage.job_store import StoreRefusedError
    from finetune_server.workers.executor import ExecutorUnavailableError

    announced = {"on_bound": _announce("listening on"), "on_metrics_bound": _announce("metrics on")}
    try:
        asyncio.run(run_server(settings, host, port, grace, **announced))
    # One line and exit 2, no traceback: a store that is unreachable, too new or another data dir's; a Ray cluster
    # that cannot be reached or cannot see the data dir.
    except (StoreRefusedError, ExecutorUnavailableError) as exc:
        common.fail(str(exc), common.EXIT_USAGE)


def _prepare_server_process(log_level: str) -> None:
    """What must hold before the server's modules load: gRPC's fork support off, and structured logging."""
    import os

    # Workers are started with fork+exec and never use gRPC in the child, so gRPC's fork handlers are not needed;
    # they are known to interfere with the asyncio server's threads. Must be set before grpc is imported.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from finetune_server.observability.logging import configure_logging

    configure_logging(log_level)


def _announce(what: str) -> Callable[[str, int], None]:
    """A callback printing `<what> host:port` on stdout at once (tests and scripts read the bound port from it)."""

    def announce(bound_host: str, bound_port: int) -> None:
        sys.stdout.write(f"{what} {bound_host}:{bound_port}\n")
        sys.stdout.flush()

    return announce


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Where the demo's model, data, jobs and server log go.")] = Path(
        "./data"
    ),
    server: Annotated[
        str | None, typer.Option(envvar="FINETUNE_SERVER", help="Use this server instead of starting one.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="A hub id or local folder instead of the embedded tiny model.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Optimizer steps (default: 150 for the tiny model, 60 for --model).")
    ] = None,
) -> None:
    """Train the embedded tiny model (or --model) on made-up facts through the service and show its answers, and its
    answers to general questions it did not train, before and after."""
    from rich.console import Console

    from finetune_server.demo.run import run_demo
    from finetune_server.observability.logging import configure_logging

    configure_logging("warning")
    raise typer.Exit(run_demo(data_dir, server=server, model=model, steps=steps, console=Console()))


# ----------------------------------------------------------------------------------------------------------------------
# configs and training
# ----------------------------------------------------------------------------------------------------------------------


@app.command()
@connects
def validate(
    remote: Remote,
    config: ConfigArgument,
    set_: SetOption = None,
    target_device: Annotated[
        str,
        typer.Option(
            help="Also judge the memory estimate against this device: rtx_3060, rtx_4090, a100_40gb, a100_80gb, "
            "h100_80gb or cpu."
        ),
    ] = "",
    json_output: JsonOption = False,
) -> None:
    """Check a config without training: violations (field, line, reason), warnings, memory estimate, device verdict.

    Exits 1 when the config is invalid.
    """
    from finetune_server.cli import common, configs, render, transfer

    with common.session(remote) as service:
        data = configs.load_config(config, set_ or [])
        # The bar is on stderr: stdout holds only the report (one JSON document with --json).
        bar = common.console(stderr=True)
        result = transfer.validate_with_progress(service, data, target_device=target_device, console=bar)
    if json_output:
        common.print_json(result.to_dict())
    else:
        render.render_validation(common.console(), result, source=str(config))
    raise typer.Exit(common.EXIT_OK if result.valid else common.EXIT_FAILED)


@app.command()
@connects
def train(
    remote: Remote,
    config: ConfigArgument,
    set_: SetOption = None,
    detach: Annotated[bool, typer.Option("--detach", help="Print the job id and return; the job runs on.")] = False,
    name: Annotated[str | None, typer.Option(help="A name for the job (default: the config file's name).")] = None,
    label: LabelOption = None,
) -> None:
    """Start a training job and show its progress until it ends (Ctrl-C detaches; it never cancels the job).

    Exits 0 when the job succeeds, 1 when the config is rejected or the job fails or is cancelled.
    """
    from finetune_client import ConfigConversionError, FinetuneServiceError, ValidationResult
    from finetune_client.convert import state_name, validation_result_from_report
    from finetune_server.cli import common, configs, progress, render

    out = common.console()
    with common.session(remote) as service:
        data = configs.load_config(config, set_ or [])
        labels = common.parse_labels(label)
        try:
            stream = service.iter_train(data, display_name=config.stem if name is None else name, labels=labels)
            job = next(stream).job
        except ConfigConversionError as exc:
            rejected = ValidationResult(valid=False, errors=exc.problems, violations=exc.violations)
            render.render_validation(out, rejected, source=str(config))
            raise typer.Exit(common.EXIT_FAILED) from None
        except FinetuneServiceError as exc:
            if exc.report is None and not exc.violations:
                raise
            rejected = (
                validation_result_from_report(exc.report)
                if exc.report is not None
                else ValidationResult(valid=False, errors=[str(v) for v in exc.violations], violations=exc.violations)
            )
            render.render_validation(out, rejected, source=str(config))
            raise typer.Exit(common.EXIT_FAILED) from None
        if detach:
            typer.echo(job.id)
            typer.echo(f"follow it with: finetune watch {job.id}{remote.server_flag()}", err=True)
            return
        intro = f"job [bold]{job.id}[/] created ({state_name(job.state)}); Ctrl-C detaches and leaves it running"
        events = (response.event for response in stream)
        code = progress.follow_until_end(service, job, events, out, intro=intro, server_flag=remote.server_flag())
    raise typer.Exit(code)


@app.command()
@connects
def watch(remote: Remote, job_id: JobArgument) -> None:
    """Show a job's progress from its first stored event until it ends (Ctrl-C stops watching, not the job).

    Exits 0 when the job succeeded, 1 when it failed or was cancelled.
    """
    from finetune_client.convert import state_name
    from finetune_server.cli import common, progress

    out = common.console()
    with common.session(remote) as service:
        job = service.get_job(job_id)
        intro = f"watching job [bold]{job.id}[/] ({state_name(job.state)}); Ctrl-C stops watching"
        events = service.watch(job.id, 0)
        code = progress.follow_until_end(service, job, events, out, intro=intro, server_flag=remote.server_flag())
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------------------------------
# jobs
# ----------------------------------------------------------------------------------------------------------------------


@jobs_app.command("list")
@connects
def jobs_list(
    remote: Remote,
    state: Annotated[
        list[JobStateName] | None, typer.Option("--state", help="Only jobs in this state (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most jobs to show, newest first.")] = 20,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", metavar="KEY=VALUE", help="Only jobs with this label (repeatable: all must match)."),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    from itertools import islice

    from finetune_server.cli import common, render

    with common.session(remote) as service:
        states = [s.value for s in state or []]
        labels = common.parse_labels(label)
        jobs = list(islice(service.list_jobs(states, page_size=min(limit, 1000), labels=labels), limit))
    if json_output:
        common.print_json(render.job_dicts(jobs))
    else:
        render.render_jobs(common.console(), jobs)


@jobs_app.command("show")
@connects
def jobs_show(
    remote: Remote,
    job_id: JobArgument,
    plot: Annotated[
        Path | None, typer.Option(help="Write the loss curve (train and eval loss by step) to this PNG file.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Show one job: state, progress, result or error, and its resolved config."""
    from finetune_client import message_to_dict
    from finetune_server.cli import common, plotting, render

    with common.session(remote) as service:
        job = service.get_job(job_id)
        if json_output:
            common.print_json(message_to_dict(job))
        else:
            render.render_job(common.console(), job)
        if plot is not None:
            written = plotting.write_loss_curve(service, job, plot)
            common.console(stderr=json_output).print(written, soft_wrap=True)


@jobs_app.command("checkpoints")
@connects
def jobs_checkpoints(remote: Remote, job_id: JobArgument, json_output: JsonOption = False) -> None:
    """A job's checkpoints: step, size, and the evaluation at that step (export one with --checkpoint or --best-by)."""
    from finetune_client import message_to_dict
    from finetune_server.cli import common, render

    with common.session(remote) as service:
        checkpoints = service.list_checkpoints(job_id)
    if json_output:
        common.print_json([message_to_dict(c) for c in checkpoints])
    else:
        render.render_checkpoints(common.console(), checkpoints)


@jobs_app.command("rm")
@connects
def jobs_rm(
    remote: Remote,
    job_id: JobArgument,
    with_artifacts: Annotated[
        bool, typer.Option("--with-artifacts", help="Delete the artifacts exported from the job too.")
    ] = False,
) -> None:
    """Delete a job that has ended: its checkpoints, adapter, logs and events (refused while it is queued or running).
    Its exported artifacts stay unless --with-artifacts."""
    from finetune_server.cli import common

    with common.session(remote) as service:
        response = service.delete_job(job_id, delete_artifacts=with_artifacts)
    artifacts = len(response.deleted_artifact_ids)
    also = f" and {artifacts} artifact{'s' if artifacts != 1 else ''}" if with_artifacts else ""
    common.console().print(
        f"[green]✓ deleted[/] [bold]{response.job.id}[/]{also}: {common.format_bytes(response.freed_bytes)} freed",
        soft_wrap=True,
    )


@app.command()
@connects
def cancel(remote: Remote, job_id: JobArgument) -> None:
    """Cancel a job: a queued one at once, a running one as soon as its worker stops. A finished job exits 1."""
    from finetune_server.cli import common

    out = common.console()
    with common.session(remote) as service:
        job = service.cancel_job(job_id)
    if job.cancel_requested and not job.end_time.seconds:
        out.print(
            f"cancel requested: job [bold]{job.id}[/]'s worker is stopping; "
            f"follow it with [bold]finetune watch {job.id}{remote.server_flag()}[/]",
            soft_wrap=True,
        )
    else:
        out.print(f"[magenta]job [bold]{job.id}[/] cancelled[/]", soft_wrap=True)


@app.command()
@connects
def chat(
    remote: Remote,
    job_id: JobArgument,
    checkpoint: Annotated[
        int | None, typer.Option(min=1, help="Talk to this checkpoint's step instead of the final adapter.")
    ] = None,
    compare_base: Annotated[
        bool, typer.Option("--compare-base", help="Let the base model answer each message too, before the tuned one.")
    ] = False,
    system: Annotated[str, typer.Option(help="A system message to start the conversation with.")] = "",
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="Most tokens per answer (default: the server's, 256).")
    ] = None,
    temperature: Annotated[float, typer.Option(min=0, help="0: greedy; above: sampled.")] = 0.0,
) -> None:
    """Chat with a job's model in the terminal: each line you type is a message, the answer streams back.

    Ends at EOF (Ctrl-D) or /exit.
    """
    from finetune_server.cli import chat as chat_session
    from finetune_server.cli import common

    out = common.console()
    with common.session(remote) as service:
        job = service.get_job(job_id)
        chosen = chat_session.speakers(job, checkpoint, compare_base, system)
        chat_session.run_chat(
            service,
            chosen,
            sys.stdin,
            out,
            prompt=sys.stdin.isatty(),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )


# ----------------------------------------------------------------------------------------------------------------------
# artifacts and datasets
# ----------------------------------------------------------------------------------------------------------------------


@app.command()
@connects
def export(
    remote: Remote,
    job_id: JobArgument,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the export into.")],
    format_: Annotated[
        ExportFormatName, typer.Option("--format", help="adapter (PEFT folder) or merged (full weights).")
    ] = ExportFormatName.adapter,
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder when it is not empty.")] = False,
    checkpoint: Annotated[
        int | None, typer.Option(min=1, help="Export this checkpoint's step instead of the final adapter.")
    ] = None,
    best_by: Annotated[
        str, typer.Option("--best-by", help="Export the checkpoint that is best by this eval metric, e.g. eval_loss.")
    ] = "",
    json_output: JsonOption = False,
) -> None:
    """Export a succeeded job's adapter or merged model, download it and verify every file's SHA-256."""
    from finetune_server.cli import common, render, transfer

    with common.session(remote) as service:
        transfer.check_output(output, force)
        result = transfer.export_with_progress(
            service,
            job_id,
            output,
            format_.value,
            force=force,
            checkpoint_step=checkpoint,
            best_checkpoint_by=best_by,
            console=common.console(stderr=json_output),
        )
    if json_output:
        common.print_json(result.to_dict())
    else:
        render.render_export(common.console(), result)


@app.command()
@connects
def upload(
    remote: Remote,
    file: Annotated[Path, typer.Argument(help="A JSONL, JSON or Parquet dataset file.")],
    format_: Annotated[
        str, typer.Option("--format", help="auto, alpaca, messages, qa or text: what each example must look like.")
    ] = "auto",
    json_output: JsonOption = False,
) -> None:
    """Upload a dataset; it is checked record by record, and its id (ds-...) can be a config's `dataset`."""
    from finetune_client import FinetuneServiceError
    from finetune_server.cli import common, render

    with common.session(remote) as service:
        if not file.is_file():
            raise common.CliError(f"dataset file not found: {file}")
        try:
            dataset = service.upload_dataset(file, data_format=format_)
        except FinetuneServiceError as exc:
            if not exc.violations:
                raise
            render.render_violations(common.console(stderr=True), exc.violations, title=f"{file} was refused")
            common.fail(exc.message, common.EXIT_FAILED, exc.hint)
    if json_output:
        common.print_json(dataset)
    else:
        render.render_upload(common.console(), dataset)


ArtifactArgument = Annotated[str, typer.Argument(help="An artifact's id (art-...).")]


@artifacts_app.command("list")
@connects
def artifacts_list(
    remote: Remote,
    job: Annotated[str, typer.Option("--job", help="Only the artifacts exported from this job.")] = "",
    limit: Annotated[int, typer.Option(min=1, help="Most artifacts to show, newest first.")] = 50,
    json_output: JsonOption = False,
) -> None:
    """List your exported artifacts, newest first."""
    from itertools import islice

    from finetune_client import message_to_dict
    from finetune_server.cli import common, render

    with common.session(remote) as service:
        artifacts = list(islice(service.list_artifacts(page_size=min(limit, 1000), job_id=job), limit))
    if json_output:
        common.print_json([message_to_dict(a) for a in artifacts])
    else:
        render.render_artifacts(common.console(), artifacts)


@artifacts_app.command("show")
@connects
def artifacts_show(remote: Remote, artifact_id: ArtifactArgument, json_output: JsonOption = False) -> None:
    """Show one artifact: its job, format, step, size, files and whether vLLM can serve it."""
    from finetune_client import message_to_dict
    from finetune_server.cli import common, render

    with common.session(remote) as service:
        artifact = service.get_artifact(artifact_id)
    if json_output:
        common.print_json(message_to_dict(artifact))
    else:
        render.render_artifact(common.console(), artifact)


@artifacts_app.command("rm")
@connects
def artifacts_rm(remote: Remote, artifact_id: ArtifactArgument) -> None:
    """Delete an artifact's files on the server (refused while it is being exported or downloaded)."""
    from finetune_server.cli import common

    with common.session(remote) as service:
        response = service.delete_artifact(artifact_id)
    common.console().print(
        f"[green]✓ deleted[/] [bold]{response.artifact.id}[/] (job {response.artifact.job_id}): "
        f"{common.format_bytes(response.freed_bytes)} freed",
        soft_wrap=True,
    )


DatasetArgument = Annotated[str, typer.Argument(help="An uploaded dataset's id (ds-...).")]


@datasets_app.command("list")
@connects
def datasets_list(
    remote: Remote,
    limit: Annotated[int, typer.Option(min=1, help="Most datasets to show, newest first.")] = 50,
    json_output: JsonOption = False,
) -> None:
    """List your uploaded datasets, newest first."""
    from itertools import islice

    from finetune_client import message_to_dict
    from finetune_server.cli import common, render

    with common.session(remote) as service:
        datasets = list(islice(service.list_datasets(page_size=min(limit, 1000)), limit))
    if json_output:
        common.print_json([message_to_dict(d) for d in datasets])
    else:
        render.render_datasets(common.console(), datasets)


@datasets_app.command("show")
@connects
def datasets_show(remote: Remote, dataset_id: DatasetArgument, json_output: JsonOption = False) -> None:
    """Show one uploaded dataset: file, size, checksum and the check made on upload."""
    from finetune_client import message_to_dict
    from finetune_server.cli import common, render

    with common.session(remote) as service:
        dataset = message_to_dict(service.get_dataset(dataset_id))
    if json_output:
        common.print_json(dataset)
    else:
        render.render_upload(common.console(), {**dataset, "already_existed": True}, title="dataset")


@datasets_app.command("rm")
@connects
def datasets_rm(remote: Remote, dataset_id: DatasetArgument) -> None:
    """Delete an uploaded dataset and its token cache entries (refused while a queued or running job uses it)."""
    from finetune_server.cli import common

    with common.session(remote) as service:
        response = service.delete_dataset(dataset_id)
    common.console().print(
        f"[green]✓ deleted[/] [bold]{response.dataset.id}[/] ({response.dataset.filename}): "
        f"{common.format_bytes(response.freed_bytes)} freed, {response.token_cache_entries_removed} token cache "
        f"entr{'y' if response.token_cache_entries_removed == 1 else 'ies'} removed",
        soft_wrap=True,
    )


# ----------------------------------------------------------------------------------------------------------------------
# presets and advice
# ----------------------------------------------------------------------------------------------------------------------


@app.command()
@connects
def presets(remote: Remote, json_output: JsonOption = False) -> None:
    """The server's presets: named sets of values for a device class that fill only what a config leaves unset."""
    from finetune_client.convert import config_to_dict
    from finetune_server.cli import common, render

    with common.session(remote) as service:
        response = service.list_presets()
    if json_output:
        common.print_json(
            {
                "presets": [
                    {
                        "name": p.name,
                        "description": p.description,
                        "device_memory_bytes": p.device_memory_bytes,
                        "config": config_to_dict(p.config),
                    }
                    for p in response.presets
                ],
                "recommendations": [render.recommendation_dict(r) for r in response.recommendations],
            }
        )
    else:
        render.render_presets(common.console(), response)


@app.command()
@connects
def recommend(
    remote: Remote,
    gpu_memory: Annotated[
        str, typer.Option(help="Memory of the GPU, e.g. 12GB, 24GiB or 8192MB (GB and GiB both mean 2**30).")
    ],
    json_output: JsonOption = False,
) -> None:
    """Which recommended models train in that much GPU memory, best first, with their preset and cautions.

    Exits 1 when none fits.
    """
    from finetune_server.cli import common, render

    with common.session(remote) as service:
        memory = common.parse_size(gpu_memory)
        recommendations = list(service.list_presets().recommendations)
    fits = [r for r in recommendations if r.min_gpu_memory_bytes <= memory]
    too_big = [r for r in recommendations if r.min_gpu_memory_bytes > memory]
    if json_output:
        common.print_json(
            {
                "gpu_memory_bytes": memory,
                "fits": [render.recommendation_dict(r) for r in fits],
                "does_not_fit": [render.recommendation_dict(r) for r in too_big],
            }
        )
    else:
        render.render_recommendations(common.console(), memory, fits, too_big)
    raise typer.Exit(common.EXIT_OK if fits else common.EXIT_FAILED)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
