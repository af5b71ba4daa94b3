"""The training report stored with a job's outputs: `metrics.json` and a `loss_curve.png`.

The chart is observability.loss_plot's. Both files are written atomically (temp file + os.replace), so a reader never
sees half a report.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from finetune_server.observability.loss_plot import render_loss_curve
from finetune_server.storage import layout
from finetune_server.util.json_values import finite

log = structlog.get_logger(__name__)


def write_report(output_dir: Path, *, metrics: dict[str, Any], history: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write `metrics.json` and `loss_curve.png` into `output_dir`; return their paths.

    `history` rows are {"step": int, "loss": float} (training) or {"step": int, "eval_loss": float}; rows without a
    finite value are skipped. Non-finite floats in `metrics` become null, so the JSON stays valid for any language.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = layout.JobDir(output_dir).metrics
    text = json.dumps(finite(metrics), indent=2, sort_keys=True, allow_nan=False, default=str) + "\n"
    _atomic_write(metrics_path, text.encode())
    train = _series(history, "loss")
    evals = _series(history, "eval_loss")
    png_path = layout.JobDir(output_dir).loss_curve
    _atomic_write(png_path, render_loss_curve(train, evals))
    log.info("training report written", dir=str(output_dir), train_points=len(train), eval_points=len(evals))
    return metrics_path, png_path


def _series(history: Iterable[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    points = []
    for row in history:
        step, value = row.get("step"), row.get(key)
        if isinstance(step, int | float) and isinstance(value, int | float) and math.isfinite(value):
            points.append((float(step), float(value)))
    return sorted(points)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).chmod(0o644)  # mkstemp creates 0600; a report is as readable as any other output file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
