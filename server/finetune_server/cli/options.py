"""The options and arguments several commands share, declared once.

Every command that drives a server takes `--server` (or FINETUNE_SERVER), `--token` (FINETUNE_TOKEN), `--tls-ca`
(FINETUNE_TLS_CA) and `--keepalive` (FINETUNE_KEEPALIVE); `@connects` adds them to a command and hands it their
values as one `remote: Remote`.
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
DEFAULT_KEEPALIVE_S = 30.0  # the client's own default (finetune_client.channel), not imported: --help stays fast

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
KeepaliveOption = Annotated[
    float,
    typer.Option(
        "--keepalive",
        envvar="FINETUNE_KEEPALIVE",
        min=0,
        help="Seconds of silence after which the connection is pinged, so a dead one is noticed (a watch of a "
        "queued job then reconnects); 0: never.",
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
LabelOption = Annotated[
    list[str] | None,
    typer.Option("--label", metavar="KEY=VALUE", help="A job label, e.g. team=nlp; repeatable."),
]
ConfigArgument = Annotated[Path, typer.Argument(help="A training config file (.json, .yaml or .yml).")]
JobArgument = Annotated[str, typer.Argument(help="The job id (job-...).")]


@dataclass(frozen=True)
class Remote:
    """Where the server is, how to authenticate and keep the connection alive: `--server`, `--token`, `--tls-ca`,
    `--keepalive`."""

    address: str
    token: str | None = None
    tls_ca: Path | None = None
    keepalive_s: float = DEFAULT_KEEPALIVE_S

    def server_flag(self) -> str:
        """What to add to a suggested command line so it reaches the same server."""
        return "" if self.address == DEFAULT_SERVER else f" --server {self.address}"


# The options `@connects` adds, in the order --help lists them (after the command's own).
_CONNECTION_OPTIONS = (
    inspect.Parameter("server", inspect.Parameter.KEYWORD_ONLY, annotation=ServerOption, default=DEFAULT_SERVER),
    inspect.Parameter("token", inspect.Parameter.KEYWORD_ONLY, annotation=TokenOption, default=None),
    inspect.Parameter("tls_ca", inspect.Parameter.KEYWORD_ONLY, annotation=TlsCaOption, default=None),
    inspect.Parameter(
        "keepalive", inspect.Parameter.KEYWORD_ONLY, annotation=KeepaliveOption, default=DEFAULT_KEEPALIVE_S
    ),
)


def connects(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the shared connection options (--server, --token, --tls-ca, --keepalive); it receives them as
    its `remote` parameter.

    Typer reads a command's options from its signature, so the wrapper shows typer the command's own parameters
    without `remote`, followed by the connection options.
    """
    own = inspect.signature(command, eval_str=True).parameters
    if "remote" not in own:
        raise TypeError(f"{command.__name__} must take a `remote: Remote` parameter")
    kept = [parameter for name, parameter in own.items() if name != "remote"]

    @functools.wraps(command)
    def with_remote(
        *args: Any, server: str, token: str | None, tls_ca: Path | None, keepalive: float, **kwargs: Any
    ) -> None:
        command(*args, remote=Remote(server, token, tls_ca, keepalive), **kwargs)

    parameters = [*kept, *_CONNECTION_OPTIONS]
    with_remote.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    with_remote.__annotations__ = {p.name: p.annotation for p in parameters}
    return with_remote
