"""JSON that every parser accepts: NaN and infinities (a diverged loss, an unknown ETA) become null; and the JSON
object files of a model folder, read leniently."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file's object; {} when it is missing, unreadable or not an object (a model folder's optional files)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def finite(value: Any) -> Any:
    """`value` with non-finite floats replaced by None, recursively through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
