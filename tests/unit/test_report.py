"""The training report: metrics.json round-trips, loss_curve.png is a real PNG that shows both series."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

from finetune_server.observability.loss_plot import EVAL, TRAIN
from finetune_server.training.engine.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode_png(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and raw RGB pixels of an 8-bit RGB, filter-0 PNG (what the report writes), checking CRCs."""
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, dict[bytes, bytes]()
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    assert b"IEND" in chunks
    width, height, depth, color_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color_type) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 3 * width + 1
    assert len(raw) == stride * height
    return width, height, b"".join(raw[y * stride + 1 : (y + 1) * stride] for y in range(height))


def _count_color(pixels: bytes, color: tuple[int, int, int]) -> int:
    target = bytes(color)
    return sum(1 for i in range(0, len(pixels), 3) if pixels[i : i + 3] == target)


def _history() -> list[dict]:
    rows: list[dict] = [{"step": s, "loss": 5.0 * math.exp(-s / 40) + 0.5} for s in range(1, 121)]
    rows += [{"step": s, "eval_loss": 5.0 * math.exp(-s / 40) + 0.7} for s in (40, 80, 120)]
    return rows


def test_writes_metrics_and_loss_curve(tmp_path: Path) -> None:
    metrics = {"train_loss": 0.61, "eval_loss": 0.83, "steps": 120, "tokens_per_second": 171.5, "run": {"seed": 3}}
    metrics_path, png_path = write_report(tmp_path / "out", metrics=metrics, history=_history())

    assert metrics_path == tmp_path / "out" / "metrics.json"
    assert json.loads(metrics_path.read_text()) == metrics

    data = png_path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 2000
    width, height, pixels = _decode_png(data)
    assert (width, height) == (800, 500)
    # The train line and the eval markers (plus their legend entries) are really drawn.
    assert _count_color(pixels, TRAIN) > 500
    assert _count_color(pixels, EVAL) >= 4 * 81
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["loss_curve.png", "metrics.json"]


def test_empty_history_still_writes_a_png(tmp_path: Path) -> None:
    _, png_path = write_report(tmp_path, metrics={}, history=[])
    width, height, pixels = _decode_png(png_path.read_bytes())
    assert (width, height) == (800, 500)
    assert _count_color(pixels, EVAL) == 81  # only the legend marker


def test_non_finite_values_keep_the_json_valid(tmp_path: Path) -> None:
    history = [{"step": 1, "loss": float("nan")}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": float("inf")}]
    metrics_path, png_path = write_report(tmp_path, metrics={"eval_loss": float("nan"), "ok": 1.0}, history=history)
    assert json.loads(metrics_path.read_text()) == {"eval_loss": None, "ok": 1.0}
    assert png_path.read_bytes().startswith(PNG_SIGNATURE)


def test_rewriting_replaces_the_report(tmp_path: Path) -> None:
    write_report(tmp_path, metrics={"steps": 1}, history=[{"step": 1, "loss": 2.0}])
    metrics_path, _ = write_report(tmp_path, metrics={"steps": 2}, history=_history())
    assert json.loads(metrics_path.read_text()) == {"steps": 2}
