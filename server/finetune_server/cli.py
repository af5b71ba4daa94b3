"""The `finetune` command: `serve` runs the server, `demo` shows the whole service on an embedded default."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from finetune_server.settings import DEFAULT_MAX_UPLOAD_BYTES, ServerSettings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune causal language models with LoRA.")


@app.callback()
def _root() -> None:
    """sage-finetune: a gRPC fine-tuning service and its command line."""


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
    slots: Annotated[int, typer.Option(min=1, help="Jobs that may train at once.")] = 1,
    max_upload_bytes: Annotated[int, typer.Option(min=1, help="Largest dataset upload.")] = DEFAULT_MAX_UPLOAD_BYTES,
    grace: Annotated[float, typer.Option(help="Seconds in-flight calls get on SIGTERM/SIGINT.")] = 10.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the gRPC server until SIGTERM or SIGINT."""
    from finetune_server.app import serve as run_server
    from finetune_server.logging import configure_logging

    configure_logging(log_level)
    settings = ServerSettings(
        data_dir=data_dir,
        model_roots=list(model_dir or []),
        dataset_roots=list(dataset_dir or []),
        offline=offline,
        hf_cache_dir=hf_cache_dir,
        slots=slots,
        max_upload_bytes=max_upload_bytes,
    )

    def announce(bound_host: str, bound_port: int) -> None:
        sys.stdout.write(f"listening on {bound_host}:{bound_port}\n")
        sys.stdout.flush()

    asyncio.run(run_server(settings, host, port, grace, on_bound=announce))


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
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 150,
) -> None:
    """Train the embedded tiny model on made-up facts through the service and show its answers before and after."""
    from rich.console import Console

    from finetune_server.demo import run_demo
    from finetune_server.logging import configure_logging

    configure_logging("warning")
    raise typer.Exit(run_demo(data_dir, server=server, model=model, steps=steps, console=Console()))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
