"""What every server command shares: the connection, exit codes, error lines, JSON output and unit formatting.

Exit codes: 0 ok; 1 a failed or invalid result (an invalid config, a failed job, a refused upload); 2 a usage error
(bad arguments, a missing file, an unknown job) or a server that cannot be reached; 130 when Ctrl-C detached from a
job. Failures print one `error: ...` line on stderr (plus a hint when the server gave one), never a traceback.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc
import typer
from rich.console import Console

from finetune_client import FinetuneServiceError, GrpcFineTuneService, ServerUnavailableError
from finetune_server.cli.options import Remote
from finetune_server.util.json_values import finite

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's convention for "ended by SIGINT"

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# The caller asked for something that does not exist or is not theirs, or sent a bad request: a usage error.
_USAGE_CODES = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


class CliError(Exception):
    """A failure already explained in words; `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


@contextmanager
def session(remote: Remote) -> Iterator[GrpcFineTuneService]:
    """A connected client for the body of the `with`; any failure in the body becomes a message and an exit code."""
    with exit_on_error(remote.address):
        service = _connect(remote)
        with service:
            yield service


def _connect(remote: Remote) -> GrpcFineTuneService:
    """The client for `remote`; a --tls-ca that cannot be read is a usage error."""
    root_certificates = None
    if remote.tls_ca is not None:
        try:
            root_certificates = remote.tls_ca.read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read the TLS CA file {remote.tls_ca}: {exc.strerror or exc}") from exc
    return GrpcFineTuneService(
        remote.address,
        token=remote.token or None,
        root_certificates=root_certificates,
        keepalive_time=remote.keepalive_s or None,
    )


@contextmanager
def exit_on_error(address: str = "") -> Iterator[None]:
    """Turn CliError and the client's errors into one `error:` line on stderr and typer.Exit with the right code."""
    try:
        yield
    except CliError as exc:
        fail(exc.message, exc.code, exc.hint)
    except ServerUnavailableError as exc:
        fail(f"cannot reach the server at {exc.address or address}: {_unavailable_detail(exc, address)}", EXIT_USAGE)
    except FinetuneServiceError as exc:
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            fail(f"the server at {address} did not answer in time: {_one_line(exc.message)}", EXIT_USAGE)
        fail(str(exc), EXIT_USAGE if exc.code in _USAGE_CODES else EXIT_FAILED)


def fail(message: str, code: int = EXIT_FAILED, hint: str = "") -> NoReturn:
    """Print `error: message` (and `hint: ...`) on stderr and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(code)


def _unavailable_detail(exc: ServerUnavailableError, address: str) -> str:
    detail = _one_line(exc.message)
    for known in {exc.address, address} - {""}:
        detail = detail.removeprefix(f"server at {known} is unavailable: ")
    return detail


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------------


def console(*, stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr, for progress beside JSON on stdout); no guessing highlights."""
    return Console(stderr=stderr, highlight=False)


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout (non-finite floats become null, so any parser accepts it)."""
    sys.stdout.write(json.dumps(finite(data), indent=2, default=str) + "\n")
    sys.stdout.flush()


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": GIB, "k": KIB, "m": MIB, "g": GIB, "t": TIB}


def parse_labels(pairs: list[str] | None) -> dict[str, str]:
    """`--label KEY=VALUE` options as a dict (the server checks the keys and values)."""
    labels: dict[str, str] = {}
    for pair in pairs or []:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise CliError(f"--label {pair!r}: expected KEY=VALUE, e.g. --label team=nlp")
        labels[key] = value
    return labels


def parse_size(text: str) -> int:
    """`12GB`, `12 GiB`, `12G`, `11.5gb`, `12000MB`, or a plain number of GB -> bytes.

    GB and GiB both mean 2**30: GPU makers quote binary sizes (a "12 GB" RTX 3060 has 12 GiB), so reading "12GB" as
    decimal would claim 0.8 GiB that the card does not have.
    """
    match = _SIZE.match(text)
    if match is None or (match.group(2) == "" and match.group(3) != ""):
        raise CliError(f"cannot read {text!r} as a memory size; write it like 12GB, 12GiB, 11.5G or 8192MB")
    return round(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_bytes(size: float) -> str:
    """1536 -> `1.5 KiB`, 12 GiB -> `12.0 GiB`."""
    for unit, name in ((TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if abs(size) >= unit:
            value = size / unit
            return f"{value:.1f} {name}" if value < 100 else f"{value:,.0f} {name}"
    return f"{size:.0f} B"


def format_duration(seconds: float | None) -> str:
    """Seconds as `h:mm:ss` (`-` when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_count(value: float) -> str:
    """Parameter counts: 1_543_714_304 -> `1.54B`, 4_350_000 -> `4.35M`."""
    for unit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= unit:
            return f"{value / unit:.3g}{suffix}"
    return f"{value:.0f}"
