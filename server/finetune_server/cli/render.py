"""Tables for people: validation reports, jobs, presets, recommendations, uploads and exports.

Every function takes what the client returns (result dataclasses, dicts or messages) and prints it; the `--json`
forms print the same data with `common.print_json` instead. Text from the server is escaped, never read as markup.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finetune_client import ExportResult, FieldViolation, ProbeComparison, ValidationResult
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client.convert import config_to_dict, message_to_dict, state_name
from finetune_server.cli.common import format_bytes, format_count, format_duration

_STATE_STYLE = {"queued": "cyan", "running": "yellow", "succeeded": "green", "failed": "red", "cancelled": "magenta"}
_MEMORY_COMPONENTS = (
    ("weights_bytes", "base model weights"),
    ("adapter_bytes", "LoRA adapter"),
    ("gradients_bytes", "gradients"),
    ("optimizer_bytes", "optimizer states"),
    ("activations_bytes", "activations"),
    ("overhead_bytes", "framework overhead"),
)


def styled_state(state: str) -> str:
    return f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]"


# ------------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------------


def render_validation(console: Console, result: ValidationResult, *, source: str = "") -> None:
    """Verdict, violations, warnings, model and dataset summaries, the memory estimate and the per-device verdict."""
    name = f" {escape(source)}" if source else ""
    if result.valid:
        console.print(f"[bold green]✓ valid[/]{name}: training would accept this config")
    else:
        count = len(result.violations) or len(result.errors)
        console.print(f"[bold red]✗ invalid[/]{name}: {count} problem{'s' if count != 1 else ''}")
    if result.violations:
        render_violations(console, result.violations)
    elif result.errors:
        for error in result.errors:
            console.print(f"  [red]•[/] {escape(error)}")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if result.model:
        console.print(_model_line(result.model))
    if result.dataset:
        console.print(_dataset_line("dataset", result.dataset))
    if result.eval_dataset:
        console.print(_dataset_line("eval dataset", result.eval_dataset))
    if result.preset_filled_fields:
        console.print(f"preset filled: {escape(', '.join(result.preset_filled_fields))}")
    if result.memory_estimate:
        render_memory_estimate(console, result.memory_estimate)


def render_violations(console: Console, violations: Sequence[FieldViolation], *, title: str = "Violations") -> None:
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("line", justify="right")
    table.add_column("reason", no_wrap=True)
    table.add_column("message")
    for violation in violations:
        message = violation.message
        if violation.line:  # the number has its own column
            for unit in ("line", "element", "row"):
                message = message.removeprefix(f"{unit} {violation.line}: ")
        table.add_row(
            escape(violation.field or "-"),
            str(violation.line) if violation.line else "",
            escape(violation.reason),
            escape(message),
        )
    console.print(table)


def render_memory_estimate(console: Console, estimate: Mapping[str, Any]) -> None:
    table = Table(title="Memory estimate", title_justify="left")
    table.add_column("component")
    table.add_column("size", justify="right")
    for key, label in _MEMORY_COMPONENTS:
        table.add_row(label, format_bytes(int(estimate.get(key, 0))))
    table.add_row("[bold]total[/]", f"[bold]{format_bytes(int(estimate.get('total_bytes', 0)))}[/]")
    console.print(table)
    details = [
        f"{format_count(int(estimate.get('trainable_parameters', 0)))} trainable of "
        f"{format_count(int(estimate.get('base_parameters', 0)))} parameters",
        f"at {estimate.get('sequence_length', 0)} tokens",
    ]
    console.print(
        escape(", ".join(details)) + (f". {escape(str(estimate['method']))}" if estimate.get("method") else "")
    )
    fits = estimate.get("fits") or []
    if not fits:
        return
    verdicts = Table(title="Fits the device?", title_justify="left")
    verdicts.add_column("device", no_wrap=True)
    verdicts.add_column("capacity", justify="right")
    verdicts.add_column("use", justify="right")
    verdicts.add_column("verdict", no_wrap=True)
    verdicts.add_column("what to change")
    for fit in fits:
        verdicts.add_row(
            escape(str(fit.get("device", ""))),
            format_bytes(int(fit.get("capacity_bytes", 0))),
            f"{float(fit.get('utilization', 0.0)):.0%}",
            "[green]✓ fits[/]" if fit.get("fits") else "[red]✗ does not fit[/]",
            escape("; ".join(fit.get("suggestions") or [])),
        )
    console.print(verdicts)


def _model_line(model: Mapping[str, Any]) -> str:
    parts = [
        f"{model.get('source', '')} {model.get('model_type', '')}".strip(),
        f"{format_count(int(model.get('num_parameters', 0)))} parameters",
        f"{model.get('num_layers', 0)} layers",
        f"up to {model.get('max_position_embeddings', 0)} tokens",
        "own chat template" if model.get("has_chat_template") else "no chat template",
    ]
    return f"model: [bold]{escape(str(model.get('name', '')))}[/] ({escape(', '.join(parts))})"


def _dataset_line(label: str, report: Mapping[str, Any]) -> str:
    return f"{label}: [bold]{escape(str(report.get('name', '')))}[/] ({escape(_dataset_summary(report))})"


def _dataset_summary(report: Mapping[str, Any]) -> str:
    formats = ", ".join(f"{k} {v}" for k, v in sorted((report.get("format_counts") or {}).items()))
    text = (
        f"{report.get('num_examples', 0)} examples, {report.get('num_valid', 0)} valid, "
        f"{report.get('num_invalid', 0)} invalid"
    )
    if formats:
        text += f" ({formats})"
    stats = report.get("token_stats")
    if stats:
        text += f"; tokens p50 {stats.get('p50', 0)}, p95 {stats.get('p95', 0)}, max {stats.get('max', 0)}"
    if report.get("num_over_max_length"):
        text += f"; {report['num_over_max_length']} longer than max_length (truncated)"
    return text


# ------------------------------------------------------------------------------------------------------------------
# jobs
# ------------------------------------------------------------------------------------------------------------------


def render_jobs(console: Console, jobs: Sequence[pb.Job]) -> None:
    if not jobs:
        console.print("no jobs")
        return
    table = Table()
    table.add_column("job", no_wrap=True, style="bold")
    table.add_column("state", no_wrap=True)
    table.add_column("name")
    table.add_column("model")
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("loss", justify="right")
    table.add_column("created", no_wrap=True)
    for job in jobs:
        table.add_row(
            job.id,
            styled_state(state_name(job.state)),
            escape(job.display_name),
            escape(job.config.model_name),
            _steps(job),
            f"{job.progress.loss:.4f}" if job.progress.step else "",
            _time(job.create_time) if job.HasField("create_time") else "",
        )
    console.print(table)


def render_job(console: Console, job: pb.Job) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    state = state_name(job.state)
    if job.cancel_requested and job.state == pb.JOB_STATE_RUNNING:
        state += " (cancel requested)"
    rows: list[tuple[str, str]] = [
        ("job", job.id),
        ("state", styled_state(state_name(job.state)) + escape(state[len(state_name(job.state)) :])),
        ("name", escape(job.display_name)),
        ("model", escape(job.config.model_name)),
        ("dataset", escape(job.config.dataset)),
    ]
    if job.owner:
        rows.append(("owner", escape(job.owner)))
    if job.labels:
        rows.append(("labels", escape(labels_text(job.labels))))
    if job.HasField("lineage"):
        rows.append(("continues", escape(lineage_text(job.lineage))))
    for label, is_set, moment in (
        ("created", job.HasField("create_time"), job.create_time),
        ("started", job.HasField("start_time"), job.start_time),
        ("ended", job.HasField("end_time"), job.end_time),
    ):
        if is_set:
            rows.append((label, _time(moment)))
    if job.HasField("progress"):
        p = job.progress
        rows.append(
            (
                "progress",
                f"step {_steps(job)}, epoch {p.epoch:.2f}, loss {p.loss:.4f}, lr {p.learning_rate:.2e}, "
                f"{p.tokens_per_second:,.0f} tok/s, elapsed {format_duration(p.elapsed.ToTimedelta().total_seconds())}",
            )
        )
        if p.HasField("memory"):
            rows.append(
                (
                    "memory",
                    f"{escape(p.memory.device)}: {format_bytes(p.memory.allocated_bytes)} now, "
                    f"{format_bytes(p.memory.peak_bytes)} peak",
                )
            )
    if job.HasField("result"):
        r = job.result
        text = f"final loss {r.final_train_loss:.4f}"
        if r.HasField("final_eval_loss"):
            text += f", eval loss {r.final_eval_loss:.4f}"
        text += (
            f", {r.steps} steps, {r.trained_tokens:,} tokens in "
            f"{format_duration(r.train_runtime.ToTimedelta().total_seconds())}"
        )
        rows.append(("result", text))
        if "final_exact_match" in r.metrics:
            rows.append(
                (
                    "held-out",
                    f"exact match {r.metrics['final_exact_match']:.0%}, "
                    f"token accuracy {r.metrics.get('final_token_accuracy', 0.0):.0%}",
                )
            )
        rows.append(("adapter", escape(r.adapter_location)))
    if job.HasField("error"):
        rows.append(("error", f"[red]{escape(error_text(job.error))}[/]"))
    if job.resume_count:
        rows.append(("resumed", f"{job.resume_count} time(s) from a checkpoint"))
    rows.append(("config", escape(_config_summary(job.config))))
    for label, value in rows:
        grid.add_row(label, value)
    console.print(grid)
    if job.HasField("result") and job.result.probes:
        render_probes(console, job.result.probes)


PROBE_TEXT_CHARS = 60  # longer answers are cut in the table (`--json` has them whole)


def render_probes(console: Console, probes: Sequence[pb.ProbeComparison] | Sequence[ProbeComparison]) -> None:
    """The eval_probes before and after training, marked ✓/✗ against their expected answers when they have one."""
    with_expected = any(p.expected for p in probes)
    table = Table(title="Probes: greedy answers before and after training", title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("prompt")
    if with_expected:
        table.add_column("expected")
    table.add_column("before training")
    table.add_column("after training")
    for probe in probes:
        cells = [str(probe.index), escape(_one_line(probe.prompt))]
        if with_expected:
            cells.append(escape(_one_line(probe.expected)))
        for answer, exact in ((probe.before, probe.before_exact_match), (probe.after, probe.after_exact_match)):
            mark = ("[green]✓[/] " if exact else "[red]✗[/] ") if probe.expected else ""
            cells.append(mark + (escape(_one_line(answer)) or "[dim](nothing)[/]"))
        table.add_row(*cells)
    console.print(table)
    if with_expected:
        scored = [p for p in probes if p.expected]
        before = sum(p.before_exact_match for p in scored)
        after = sum(p.after_exact_match for p in scored)
        console.print(f"probes answered exactly: {before}/{len(scored)} before, {after}/{len(scored)} after training")


def _one_line(text: str) -> str:
    """Whitespace runs as one space (a newline as ⏎), cut to PROBE_TEXT_CHARS."""
    flat = " ⏎ ".join(" ".join(line.split()) for line in text.strip().splitlines())
    return flat if len(flat) <= PROBE_TEXT_CHARS else flat[: PROBE_TEXT_CHARS - 1] + "…"


def lineage_text(lineage: pb.JobLineage) -> str:
    """`job-1a2b's checkpoint at step 4, with its optimizer state` or `job-1a2b's final adapter`."""
    source = lineage.source_job_id
    if lineage.HasField("source_checkpoint_step"):
        text = f"{source}'s checkpoint at step {lineage.source_checkpoint_step}"
    else:
        text = f"{source}'s final adapter"
    return text + (", with its optimizer state" if lineage.optimizer_resumed else "")


def error_text(error: pb.JobError) -> str:
    text = f"{error.reason}: {error.message}" if error.reason else error.message
    if error.step:
        text += f" (at step {error.step})"
    if error.hint:
        text += f"; hint: {error.hint}"
    return text


def _config_summary(config: pb.TrainingConfig) -> str:
    values = config_to_dict(config)
    values.pop("model_name", None)
    values.pop("dataset", None)
    lora = values.pop("lora", {})
    parts = [f"{k}={v}" for k, v in values.items()]
    parts += [f"lora.{k}={v}" for k, v in lora.items()]
    return ", ".join(parts)


def _steps(job: pb.Job) -> str:
    total = job.progress.total_steps or job.config.max_steps
    return f"{job.progress.step}/{total}" if total else str(job.progress.step)


def _time(timestamp: Timestamp) -> str:
    """A protobuf Timestamp in local time, to the second."""
    moment: datetime = timestamp.ToDatetime(tzinfo=UTC).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


# ------------------------------------------------------------------------------------------------------------------
# presets and recommendations
# ------------------------------------------------------------------------------------------------------------------


def render_presets(console: Console, response: pb.ListPresetsResponse) -> None:
    table = Table(title="Presets (fill only the fields a config leaves unset)", title_justify="left", show_lines=True)
    table.add_column("preset", style="bold", no_wrap=True)
    table.add_column("device", justify="right", no_wrap=True)
    table.add_column("description")
    table.add_column("values")
    for preset in response.presets:
        values = config_to_dict(preset.config)
        lora = values.pop("lora", {})
        fields = [f"{k}={v}" for k, v in values.items()] + [f"lora.{k}={v}" for k, v in lora.items()]
        device = format_bytes(preset.device_memory_bytes) if preset.device_memory_bytes else "any"
        table.add_row(escape(preset.name), device, escape(preset.description), escape("\n".join(fields)))
    console.print(table)
    console.print("Use one with [bold]preset: NAME[/] in a config; see [bold]finetune recommend[/] for models.")


def recommendation_dict(recommendation: pb.ModelRecommendation) -> dict[str, Any]:
    return {
        "model_name": recommendation.model_name,
        "description": recommendation.description,
        "preset": recommendation.preset,
        "min_gpu_memory_bytes": recommendation.min_gpu_memory_bytes,
        "cautions": list(recommendation.cautions),
    }


def render_recommendations(
    console: Console,
    memory_bytes: int,
    fits: Sequence[pb.ModelRecommendation],
    too_big: Sequence[pb.ModelRecommendation],
) -> None:
    if fits:
        table = Table(title=f"Models that train in {format_bytes(memory_bytes)}, best first", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("model", style="bold", no_wrap=True)
        table.add_column("preset", no_wrap=True)
        table.add_column("needs", justify="right", no_wrap=True)
        table.add_column("why / cautions")
        for rank, rec in enumerate(fits, start=1):
            notes = escape(rec.description) + "".join(f"\n[yellow]⚠ {escape(c)}[/]" for c in rec.cautions)
            table.add_row(
                str(rank), escape(rec.model_name), escape(rec.preset), format_bytes(rec.min_gpu_memory_bytes), notes
            )
        console.print(table)
    else:
        console.print(f"[red]no recommended model trains in {format_bytes(memory_bytes)}[/]")
    for rec in too_big:
        cautions = "".join(f"; {c}" for c in rec.cautions)
        console.print(
            f"[dim]does not fit: {escape(rec.model_name)} needs {format_bytes(rec.min_gpu_memory_bytes)}"
            f"{escape(cautions)}[/]"
        )


# ------------------------------------------------------------------------------------------------------------------
# uploads and exports
# ------------------------------------------------------------------------------------------------------------------


def render_checkpoints(console: Console, checkpoints: Sequence[pb.Checkpoint]) -> None:
    if not checkpoints:
        console.print("no checkpoints")
        return
    table = Table()
    table.add_column("step", justify="right", no_wrap=True, style="bold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("eval loss", justify="right")
    table.add_column("perplexity", justify="right")
    table.add_column("saved", no_wrap=True)
    for checkpoint in checkpoints:
        evaluated = checkpoint.HasField("eval")
        table.add_row(
            str(checkpoint.step),
            format_bytes(checkpoint.size_bytes),
            f"{checkpoint.eval.eval_loss:.4f}" + (" (best)" if checkpoint.eval.is_best else "") if evaluated else "",
            f"{checkpoint.eval.perplexity:.2f}" if evaluated else "",
            _time(checkpoint.create_time),
        )
    console.print(table)


def render_datasets(console: Console, datasets: Sequence[pb.Dataset]) -> None:
    if not datasets:
        console.print("no datasets")
        return
    table = Table()
    table.add_column("dataset", no_wrap=True, style="bold")
    table.add_column("file")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("examples", justify="right")
    table.add_column("uploaded", no_wrap=True)
    for dataset in datasets:
        table.add_row(
            dataset.id,
            escape(dataset.filename),
            format_bytes(dataset.size_bytes),
            format_count(dataset.report.num_valid),
            _time(dataset.create_time) if dataset.HasField("create_time") else "",
        )
    console.print(table)


def labels_text(labels: Mapping[str, str]) -> str:
    """`k=v, k2=v2` in key order, as `--label` takes them."""
    return ", ".join(f"{key}={labels[key]}" for key in sorted(labels))


def render_artifacts(console: Console, artifacts: Sequence[pb.Artifact]) -> None:
    if not artifacts:
        console.print("no artifacts")
        return
    table = Table()
    table.add_column("artifact", no_wrap=True, style="bold")
    table.add_column("job", no_wrap=True)
    table.add_column("format", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    for artifact in artifacts:
        table.add_row(
            artifact.id,
            artifact.job_id,
            _format_name(artifact.format),
            str(artifact.step),
            format_bytes(artifact.total_size_bytes),
            _time(artifact.create_time) if artifact.HasField("create_time") else "",
        )
    console.print(table)


def render_artifact(console: Console, artifact: pb.Artifact) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("artifact", artifact.id)
    grid.add_row("job", artifact.job_id)
    grid.add_row("format", _format_name(artifact.format))
    grid.add_row("step", str(artifact.step))
    grid.add_row("base model", escape(artifact.base_model))
    grid.add_row("size", f"{format_bytes(artifact.total_size_bytes)} in {len(artifact.files)} files")
    if artifact.owner:
        grid.add_row("owner", escape(artifact.owner))
    if artifact.HasField("create_time"):
        grid.add_row("created", _time(artifact.create_time))
    if artifact.vllm.compatible:
        grid.add_row("vLLM", escape(artifact.vllm.serve_command))
    for problem in artifact.vllm.problems:
        grid.add_row("vLLM", f"[yellow]cannot serve it:[/] {escape(problem)}")
    console.print(grid)


def _format_name(value: pb.ExportFormat.ValueType) -> str:
    known = value in pb.ExportFormat.values()
    return pb.ExportFormat.Name(value).removeprefix("EXPORT_FORMAT_").lower() if known else ""


def render_upload(console: Console, dataset: Mapping[str, Any], *, title: str = "") -> None:
    verb = title or ("already uploaded" if dataset.get("already_existed") else "uploaded")
    console.print(f"[green]✓ {verb}[/] [bold]{escape(str(dataset.get('id', '')))}[/]")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("file", escape(str(dataset.get("filename", ""))))
    grid.add_row("size", format_bytes(int(dataset.get("size_bytes", 0))))
    grid.add_row("sha256", str(dataset.get("sha256", "")))
    report = dataset.get("report")
    if report:
        grid.add_row("examples", escape(_dataset_summary(report)))
    console.print(grid)
    console.print(f"Train on it with [bold]dataset: {escape(str(dataset.get('id', '')))}[/] in a config.")


def render_export(console: Console, result: ExportResult) -> None:
    count = len(result.files)
    console.print(
        f"[green]✓ exported[/] {result.format} to [bold]{escape(result.output_path)}[/]: {count} file"
        f"{'s' if count != 1 else ''}, {format_bytes(result.total_size_bytes)}, every SHA-256 verified"
    )
    table = Table()
    table.add_column("file", no_wrap=True)
    table.add_column("size", justify="right")
    table.add_column("sha256", no_wrap=True)
    for file in result.files:
        table.add_row(
            escape(str(file.get("path", ""))),
            format_bytes(int(file.get("size_bytes", 0))),
            str(file.get("sha256", ""))[:16] + "…",
        )
    console.print(table)
    vllm = result.vllm or {}
    if vllm.get("compatible"):
        console.print("vLLM can serve it: " + escape(str(vllm.get("serve_command", ""))))
    else:
        for problem in vllm.get("problems") or []:
            console.print(f"[yellow]vLLM cannot serve it:[/] {escape(str(problem))}")


def job_dicts(jobs: Iterable[pb.Job]) -> list[dict[str, Any]]:
    return [message_to_dict(job) for job in jobs]
