"""Long client calls with a bar: `finetune export` (refuse to clobber a folder, show the export's stages, let the
client download and verify) and `finetune validate` (how far the dataset checks are)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from finetune_client import ExportResult, GrpcFineTuneService, ValidationResult
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_server.cli.common import EXIT_USAGE, CliError


def check_output(output: Path, force: bool) -> None:
    """A non-empty folder (or a file) is replaced only with --force; checked before the server does any work."""
    if force or not (output.exists() or output.is_symlink()):
        return
    if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
        return
    what = "folder is not empty" if output.is_dir() else "path exists and is not a folder"
    raise CliError(f"{output}: the {what}; pass --force to replace it", EXIT_USAGE)


def export_with_progress(
    service: GrpcFineTuneService,
    job_id: str,
    output: Path,
    export_format: str,
    *,
    force: bool,
    checkpoint_step: int | None,
    console: Console,
    best_checkpoint_by: str = "",
) -> ExportResult:
    """Run the export with a bar over the server's stages; the client then downloads each file and checks its
    SHA-256 before moving the folder into place (a mismatch raises DATA_LOSS and leaves nothing behind)."""
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=30), TaskProgressColumn())
    with Progress(*columns, console=console, transient=True) as progress:  # the result table follows
        task = progress.add_task(f"exporting {job_id} ({export_format})", total=1.0)

        def on_progress(update: pb.ExportProgress) -> None:
            stage = update.stage.replace("_", " ")
            done = update.fraction >= 1.0
            description = "downloading and verifying checksums" if done else f"{stage}: {update.message}".strip(": ")
            progress.update(task, completed=update.fraction, description=description)

        try:
            result = service.export_model(
                output,
                format=export_format,
                job_id=job_id,
                overwrite=force,
                checkpoint_step=checkpoint_step,
                best_checkpoint_by=best_checkpoint_by,
                progress_callback=on_progress,
            )
        except FileExistsError as exc:  # the folder filled up while the export ran
            raise CliError(f"{exc}; pass --force to replace it", EXIT_USAGE) from exc
    return result


def validate_with_progress(
    service: GrpcFineTuneService, config: dict[str, object], *, target_device: str, console: Console
) -> ValidationResult:
    """Validate through the streamed call, with a bar over the dataset checks (a big dataset takes a while); the
    bar goes away when the report is there."""
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=30), TaskProgressColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("validating", total=None)

        def on_progress(update: pb.ValidationProgress) -> None:
            progress.update(
                task,
                description=f"checking {update.field}: {update.records_checked:,} records",
                completed=update.records_checked,
                total=update.records_estimated or None,
            )

        return service.validate_config(config, target_device=target_device, on_progress=on_progress)
