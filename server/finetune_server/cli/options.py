"""The options and arguments several commands share, declared once.

Every command that drives a server takes `--server` (or FINETUNE_SERVER), `--token` (FINETUNE_TOKEN) and `--tls-ca`
(FINETUNE_TLS_CA); `@connects` adds the three to a command and hands it their values as one `remote: Remote`.
Only typer is imported here, so `finetune --help` stays fast.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_SERVER = "127.0.0.1:50051"

ServerOption = Annotated[
    str, typer.Option("--server", envvar="FINETUNE_SERVER", help="The server's host:port.", rich_help_panel="Server")
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="FINETUNE_TOKEN", help="Bearer token sent to the server.", rich_help_panel="Server"),
]
TlsCaOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca",
        envvar="FINETUNE_TLS_CA",
        help="PEM file of the certificate authority to trust; connects with TLS.",
        rich_help_panel="Server",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="FIELD=VALUE",
        help="Override a config field by its dotted path, e.g. lora.r=16 (the value is read as JSON when it parses, "
        "else as text); repeatable.",
    ),
]
ConfigArgument = Annotated[Path, typer.Argument(help="A training config file (.json, .yaml or .yml).")]
JobArgument = Annotated[str, typer.Argument(help="The job id (job-...).")]


@dataclass(frozen=True)
class Remote:
    """Where the server is and how to authenticate: `--server`, `--token`, `--tls-ca`."""

    address: str
    token: str | None = None
    tls_ca: Path | None = None

    def server_flag(self) -> str:
        """What to add to a suggested command line so it reaches the same server."""
        return "" if self.address == DEFAULT_SERVER else f" --server {self.address}"


# The options `@connects` adds, in the order --help lists them (after the command's own).
_CONNECTION_OPTIONS = (
    inspect.Parameter("server", inspect.Parameter.KEYWORD_ONLY, annotation=ServerOption, default=DEFAULT_SERVER),
    inspect.Parameter("token", inspect.Parameter.KEYWORD_ONLY, annotation=TokenOption, default=None),
    inspect.Parameter("tls_ca", inspect.Parameter.KEYWORD_ONLY, annotation=TlsCaOption, default=None),
)


def connects(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the shared --server, --token and --tls-ca options; it receives them as its `remote` parameter.

    Typer reads a command's options from its signature, so the wrapper shows typer the command's own parameters
    without `remote`, followed by the three connection options.
    """
    own = inspect.signature(command, eval_str=True).parameters
    if "remote" not in own:
        raise TypeError(f"{command.__name__} must take a `remote: Remote` parameter")
    kept = [parameter for name, parameter in own.items() if name != "remote"]

    @functools.wraps(command)
    def with_remote(*args: Any, server: str, token: str | None, tls_ca: Path | None, **kwargs: Any) -> None:
        command(*args, remote=Remote(server, token, tls_ca), **kwargs)

    parameters = [*kept, *_CONNECTION_OPTIONS]
    with_remote.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    with_remote.__annotations__ = {p.name: p.annotation for p in parameters}
    return with_remote
