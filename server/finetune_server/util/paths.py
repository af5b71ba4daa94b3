"""Confinement of caller-named paths to configured roots, and the size (and removal) of a folder.

A caller may name a local model folder or a server-side dataset, but only under the roots the operator configured.
`..`, absolute paths outside the roots and symlinks that lead out are refused with PERMISSION_DENIED; `~` is a
plain character (never expanded), so `~/x` and `~user` name folders under a root like any other relative name.
"""

from __future__ import annotations

import contextlib
import shutil
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from finetune_server.errors import ErrorKind, FinetuneError, Violation

# The operating system's limits (Linux: NAME_MAX, PATH_MAX), and a depth no real model or dataset path comes near.
NAME_MAX_BYTES = 255
PATH_MAX_BYTES = 4096
MAX_DEPTH = 64


def _invalid_name(field_path: str, message: str) -> FinetuneError:
    return FinetuneError(
        ErrorKind.INVALID_ARGUMENT,
        "INVALID_NAME",
        f"{field_path}: {message}",
        violations=[Violation(field_path, "INVALID_NAME", message)],
    )


def check_name(name: str, field_path: str) -> None:
    """INVALID_ARGUMENT for a caller-supplied name no file system could hold: checked before the OS sees it, so the
    answer names the field instead of being whatever error (or INTERNAL) the OS call would have led to."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid_name(field_path, "is not valid UTF-8 (it contains a lone surrogate)") from None
    bad = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise _invalid_name(field_path, f"contains the control character {bad!r}")
    if len(encoded) > PATH_MAX_BYTES:
        raise _invalid_name(field_path, f"is {len(encoded)} bytes long; at most {PATH_MAX_BYTES} are allowed")
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    longest = max((len(p.encode()) for p in parts), default=0)
    if longest > NAME_MAX_BYTES:
        raise _invalid_name(
            field_path, f"has a component of {longest} bytes; at most {NAME_MAX_BYTES} per component are allowed"
        )
    if len(parts) > MAX_DEPTH:
        raise _invalid_name(field_path, f"is {len(parts)} components deep; at most {MAX_DEPTH} are allowed")


def looks_like_path(name: str) -> bool:
    """True when `name` is meant as a filesystem path rather than a hub id (`org/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name in {".", ".."} or "\\" in name or name.count("/") > 1


def confine(name: str, roots: Sequence[Path], field_path: str) -> Path:
    """Resolve `name` (absolute, or relative to a root) to a real path inside one of `roots`.

    Relative names are tried against each root in order; the first that exists wins, else the first root's candidate
    is returned (so "not found" can be reported by the caller). Symlinks are resolved before the check.
    """
    if "\x00" in name:
        raise FinetuneError(
            ErrorKind.INVALID_ARGUMENT,
            "INVALID_PATH",
            f"{field_path}: contains a NUL character",
            violations=[Violation(field_path, "INVALID_PATH", "contains a NUL character")],
        )
    check_name(name, field_path)
    try:
        return _confine(name, roots, field_path)
    except OSError as exc:  # ENAMETOOLONG with a long root, ELOOP...: the caller's name, not the server, is at fault
        message = f"{name!r} cannot be looked up: {exc.strerror or exc}"
        raise FinetuneError(
            ErrorKind.INVALID_ARGUMENT,
            "INVALID_PATH",
            f"{field_path}: {message}",
            violations=[Violation(field_path, "INVALID_PATH", message)],
        ) from exc


def _confine(name: str, roots: Sequence[Path], field_path: str) -> Path:
    if not roots:
        raise FinetuneError(
            ErrorKind.PERMISSION_DENIED,
            "NO_ROOT_CONFIGURED",
            f"{field_path}: local paths are not allowed: the server has no root configured for them",
            violations=[Violation(field_path, "PATH_NOT_ALLOWED", "no root is configured for local paths")],
            hint="Start the server with --model-dir / --dataset-dir, or use a hub id / an uploaded dataset.",
        )
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    # Never expanded: a caller's "~" is not the server's home, and "~user" would look up accounts on this host.
    raw = Path(name)
    candidates = [raw.resolve()] if raw.is_absolute() else [(root / raw).resolve() for root in resolved_roots]
    inside = [c for c in candidates if any(c == r or c.is_relative_to(r) for r in resolved_roots)]
    if not inside:
        raise FinetuneError(
            ErrorKind.PERMISSION_DENIED,
            "PATH_OUTSIDE_ROOTS",
            f"{field_path}: {name!r} is outside the allowed folders",
            violations=[Violation(field_path, "PATH_OUTSIDE_ROOTS", f"{name!r} resolves outside the allowed folders")],
            hint="Name a path inside the server's configured folders (see GetServerInfo).",
        )
    for candidate in inside:
        if candidate.exists():
            return candidate
    return inside[0]


def folder_bytes(folder: Path) -> int:
    """The size of the files under `folder`; files that vanish while it is summed count nothing."""
    total = 0
    for path in Path(folder).rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def remove_folder(folder: Path) -> int:
    """Delete `folder` and everything under it (nothing when it does not exist); returns the bytes its files held."""
    if not folder.is_dir():
        return 0
    size = folder_bytes(folder)
    shutil.rmtree(folder)
    return size
