"""Training configs from JSON or YAML files, with `--set field.path=value` overrides.

The dict is sent as it is: unknown keys and wrong types are reported by the client's conversion as violations (the
same table as the server's), so nothing here duplicates the contract's field list.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from finetune_server.cli.common import CliError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-4` (no dot) as a string; configs write learning rates that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_config(path: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read `path` (`.json`, else YAML, which JSON is a subset of) and apply the `--set` overrides in order."""
    if not path.exists():
        raise CliError(f"config file not found: {path}")
    if not path.is_file():
        raise CliError(f"config path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the config file {path}: {exc}") from exc
    data = _parse(path, text)
    if data is None:
        data = {}  # an empty file: everything may come from --set
    if not isinstance(data, dict):
        raise CliError(f"{path}: a config must be a mapping of field names to values, not a {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return data


def _parse(path: Path, text: str) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(f"{path}: not valid JSON: {exc}") from exc
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from exc


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem or exc.context} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def parse_override(item: str) -> tuple[list[str], Any]:
    """`lora.r=16` -> (["lora", "r"], 16). The value is JSON when it parses as JSON (numbers, true/false, null,
    lists, quoted strings), otherwise the raw text: `--set dataset=train.jsonl` needs no quotes."""
    key, sep, raw = item.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise CliError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set lora.r=16 or --set dataset=train.jsonl")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return path, value


def apply_override(config: dict[str, Any], item: str) -> None:
    """Set one dotted path in `config`, creating sections (`lora`) as needed."""
    path, value = parse_override(item)
    node = config
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            section = ".".join(path[: depth + 1])
            raise CliError(f"--set {item!r}: {section} is {child!r} in the config, not a section")
        node = child
    node[path[-1]] = value
