"""The loss-curve PNG of a job: train loss and eval loss against steps.

Drawn with a tiny raster plotter (5x7 bitmap font, zlib) instead of matplotlib: a server that trains models should
not pull a plotting stack and its font cache into every worker for one chart. The worker writes it into the job's
report and `finetune jobs show --plot` draws the same chart from a job's stored events.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Sequence

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (30, 30, 30)
GRID: Color = (225, 225, 225)
TRAIN: Color = (31, 119, 180)
EVAL: Color = (214, 39, 40)


WIDTH, HEIGHT = 800, 500
LEFT, RIGHT, TOP, BOTTOM = 90, 30, 50, 60  # margins around the plot area
SCALE = 2  # font pixel size


def render_loss_curve(train: Sequence[tuple[float, float]], evals: Sequence[tuple[float, float]]) -> bytes:
    """A PNG of train loss (line) and eval loss (markers) by step, with axes, ticks, labels, title and legend."""
    canvas = _Canvas(WIDTH, HEIGHT, WHITE)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM  # plot area in pixels (y grows downwards)
    canvas.text_centered("TRAINING LOSS", WIDTH // 2, 16, BLACK)
    canvas.text_centered("STEP", (x0 + x1) // 2, HEIGHT - 22, BLACK)
    canvas.text_vertical("LOSS", 12, (y0 + y1) // 2, BLACK)

    points = [*train, *evals]
    if points:
        xmin, xmax = _range([p[0] for p in points])
        ymin, ymax = _range([p[1] for p in points])
    else:
        xmin, xmax, ymin, ymax = 0.0, 1.0, 0.0, 1.0

    def px(x: float) -> int:
        return round(x0 + (x - xmin) / (xmax - xmin) * (x1 - x0))

    def py(y: float) -> int:
        return round(y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))

    for tick in _ticks(xmin, xmax, integer=True):
        canvas.line(px(tick), y0, px(tick), y1, GRID)
        canvas.line(px(tick), y1, px(tick), y1 + 5, BLACK)
        canvas.text_centered(_fmt(tick), px(tick), y1 + 10, BLACK)
    for tick in _ticks(ymin, ymax):
        canvas.line(x0, py(tick), x1, py(tick), GRID)
        canvas.line(x0 - 5, py(tick), x0, py(tick), BLACK)
        label = _fmt(tick)
        canvas.text(label, x0 - 8 - _text_width(label), py(tick) - 7, BLACK)
    canvas.rect_outline(x0, y0, x1, y1, BLACK)

    for (ax, ay), (bx, by) in itertools.pairwise(train):
        canvas.line(px(ax), py(ay), px(bx), py(by), TRAIN, thick=2)
    if len(train) == 1:
        canvas.fill_rect(px(train[0][0]) - 2, py(train[0][1]) - 2, 5, 5, TRAIN)
    for x, y in evals:
        canvas.fill_rect(px(x) - 4, py(y) - 4, 9, 9, EVAL)

    if not points:
        canvas.text_centered("NO DATA YET", (x0 + x1) // 2, (y0 + y1) // 2 - 7, BLACK)
    # Legend, top right inside the plot area.
    lx, ly = x1 - 170, y0 + 12
    canvas.line(lx, ly + 7, lx + 30, ly + 7, TRAIN, thick=2)
    canvas.text("TRAIN", lx + 40, ly, BLACK)
    canvas.fill_rect(lx + 11, ly + 27, 9, 9, EVAL)
    canvas.text("EVAL", lx + 40, ly + 24, BLACK)
    return canvas.png()


def _range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 if hi > lo else max(abs(lo) * 0.1, 1.0)
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, target: int = 6, *, integer: bool = False) -> list[float]:
    """'Nice' tick values (1, 2 or 5 times a power of ten) inside [lo, hi]; whole numbers only for steps."""
    raw = (hi - lo) / target
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    if integer:
        step = max(step, 1)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(value: float) -> str:
    if abs(value - round(value)) < 1e-9 and abs(value) < 1e7:
        return str(round(value))
    return f"{value:.4g}".upper()


# 5x7 bitmap glyphs, one string per row, '#' = ink. Upper case only: lower-case input is drawn in upper case.
_FONT: dict[str, tuple[str, ...]] = {
    " ": (".....",) * 7,
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    ".": (".....", ".....", ".....", ".....", ".....", ".##..", ".##.."),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    "+": (".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."),
    ":": (".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."),
    "_": (".....", ".....", ".....", ".....", ".....", ".....", "#####"),
    "/": (".....", "....#", "...#.", "..#..", ".#...", "#....", "....."),
    "(": ("...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."),
    ")": (".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."),
    "?": (".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
}
_ADVANCE = 6 * SCALE  # glyph width plus one column of spacing


def _text_width(text: str) -> int:
    return len(text) * _ADVANCE - SCALE


class _Canvas:
    """An RGB raster with just enough drawing for a line chart."""

    def __init__(self, width: int, height: int, background: Color) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def fill_rect(self, x: int, y: int, w: int, h: int, color: Color) -> None:
        xa, xb = max(x, 0), min(x + w, self.width)
        if xa >= xb:
            return
        run = bytes(color) * (xb - xa)
        for yy in range(max(y, 0), min(y + h, self.height)):
            i = 3 * (yy * self.width + xa)
            self.pixels[i : i + len(run)] = run

    def line(self, xa: int, ya: int, xb: int, yb: int, color: Color, *, thick: int = 1) -> None:
        """Bresenham's line; `thick` draws a square pen of that size."""
        dx, dy = abs(xb - xa), -abs(yb - ya)
        sx, sy = (1 if xa < xb else -1), (1 if ya < yb else -1)
        err = dx + dy
        while True:
            if thick == 1:
                self.set(xa, ya, color)
            else:
                self.fill_rect(xa - thick // 2, ya - thick // 2, thick, thick, color)
            if xa == xb and ya == yb:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                xa += sx
            if e2 <= dx:
                err += dx
                ya += sy

    def rect_outline(self, xa: int, ya: int, xb: int, yb: int, color: Color) -> None:
        self.line(xa, ya, xb, ya, color)
        self.line(xa, yb, xb, yb, color)
        self.line(xa, ya, xa, yb, color)
        self.line(xb, ya, xb, yb, color)

    def text(self, text: str, x: int, y: int, color: Color) -> None:
        """Draw `text` with its top-left corner at (x, y)."""
        for n, char in enumerate(text.upper()):
            glyph = _FONT.get(char, _FONT["?"])
            for row, bits in enumerate(glyph):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        self.fill_rect(x + n * _ADVANCE + col * SCALE, y + row * SCALE, SCALE, SCALE, color)

    def text_centered(self, text: str, cx: int, y: int, color: Color) -> None:
        self.text(text, cx - _text_width(text) // 2, y, color)

    def text_vertical(self, text: str, x: int, cy: int, color: Color) -> None:
        """Draw `text` rotated 90 degrees counter-clockwise (reading bottom to top), centred on cy."""
        bottom = cy + _text_width(text) // 2
        for n, char in enumerate(text.upper()):
            glyph = _FONT.get(char, _FONT["?"])
            for row, bits in enumerate(glyph):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        gx = x + row * SCALE
                        gy = bottom - n * _ADVANCE - (col + 1) * SCALE
                        self.fill_rect(gx, gy, SCALE, SCALE, color)

    def png(self) -> bytes:
        stride = 3 * self.width
        # Filter type 0 (none) before every scanline.
        raw = b"".join(b"\x00" + bytes(self.pixels[y * stride : (y + 1) * stride]) for y in range(self.height))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND")


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
