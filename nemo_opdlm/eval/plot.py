"""Line plots of accuracy against training tokens, saved as PNG with or without matplotlib.

One job: draw one or more side-by-side panels of named (x, y) series (plus horizontal reference
lines) to a PNG file. With matplotlib importable it is used; otherwise a small NumPy rasteriser
with a built-in 5x7 bitmap font writes the PNG itself (zlib + the PNG chunk format), so the demo
and the benchmark always produce a plot. Non-goals: styling beyond legible lines, ticks, labels
and a legend.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    lo: Optional[Sequence[float]] = None
    """With ``hi``: a band drawn around the line (e.g. the min and max over seeds)."""
    hi: Optional[Sequence[float]] = None


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    hlines: list[tuple[str, float]] = field(default_factory=list)
    """(label, y) horizontal reference lines, e.g. the teacher's accuracy."""
    ylim: tuple[float, float] = (0.0, 1.0)


COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def save_line_plot(path: str, panels: Sequence[Panel], title: Optional[str] = None,
                   columns: Optional[int] = None) -> str:
    """Write the panels to ``path`` (``columns`` per row, default all in one row); returns the backend
    used ('matplotlib' or 'builtin')."""
    cols = min(columns or len(panels), len(panels))
    rows = -(-len(panels) // cols)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        write_png(path, render(panels, title, columns=cols))
        return "builtin"
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        for i, s in enumerate(panel.series):
            color = np.array(COLORS[i % len(COLORS)]) / 255
            if s.lo is not None and s.hi is not None:
                ax.fill_between(s.xs, s.lo, s.hi, color=color, alpha=0.18, lw=0)
            ax.plot(s.xs, s.ys, marker="o", ms=3, label=s.label, color=color)
        for j, (label, y) in enumerate(panel.hlines):
            ax.axhline(y, ls="--", lw=1, color="k", alpha=0.6 - 0.2 * j, label=label)
        ax.set_title(panel.title)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: short_number(v)))
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_ylim(*panel.ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


# --- the built-in rasteriser -------------------------------------------------------------------

# 5x7 glyphs, one string of 7 rows of 5 bits each (lowercase letters are drawn as capitals).
_FONT_ROWS = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    ".": "00000 00000 00000 00000 00000 01100 01100", ",": "00000 00000 00000 00000 01100 00100 01000",
    "-": "00000 00000 00000 11111 00000 00000 00000", "+": "00000 00100 00100 11111 00100 00100 00000",
    "/": "00001 00010 00010 00100 01000 01000 10000", "%": "11001 11010 00010 00100 01000 01011 10011",
    "(": "00010 00100 01000 01000 01000 00100 00010", ")": "01000 00100 00010 00010 00010 00100 01000",
    ":": "00000 01100 01100 00000 01100 01100 00000", "=": "00000 00000 11111 00000 11111 00000 00000",
    "_": "00000 00000 00000 00000 00000 00000 11111", "#": "01010 01010 11111 01010 11111 01010 01010",
    "'": "00100 00100 01000 00000 00000 00000 00000", ">": "01000 00100 00010 00001 00010 00100 01000",
    "<": "00010 00100 01000 10000 01000 00100 00010", "*": "00000 10101 01110 11111 01110 10101 00000",
    " ": "00000 00000 00000 00000 00000 00000 00000", "?": "01110 10001 00001 00010 00100 00000 00100",
}
_FONT = {ch: np.array([[c == "1" for c in row] for row in rows.split()], dtype=bool) for ch, rows in _FONT_ROWS.items()}


def _text(img: np.ndarray, x: int, y: int, text: str, color=(0, 0, 0), scale: int = 1, vertical: bool = False,
          anchor: str = "left") -> None:
    """Draw ``text`` with its top-left at (x, y) (centred / right-aligned by ``anchor``)."""
    width = (6 * len(text) - 1) * scale
    if anchor == "center":
        (y := y - width // 2) if vertical else (x := x - width // 2)
    elif anchor == "right":
        x -= width
    for i, ch in enumerate(text):
        glyph = _FONT.get(ch.upper(), _FONT["?"])
        if scale > 1:
            glyph = glyph.repeat(scale, 0).repeat(scale, 1)
        if vertical:  # bottom-to-top text, for the y label
            glyph = np.rot90(glyph)
            gy, gx = y + width - (i + 1) * 6 * scale + scale, x
        else:
            gy, gx = y, x + i * 6 * scale
        h, w = glyph.shape
        region = img[max(gy, 0): gy + h, max(gx, 0): gx + w]
        mask = glyph[max(-gy, 0): max(-gy, 0) + region.shape[0], max(-gx, 0): max(-gx, 0) + region.shape[1]]
        region[mask] = color


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, width: int = 2,
          dash: int = 0) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    if dash:
        keep = (np.arange(n) // dash) % 2 == 0
        xs, ys = xs[keep], ys[keep]
    h, w, _ = img.shape
    for dx in range(-(width // 2), width - width // 2):
        for dy in range(-(width // 2), width - width // 2):
            ok = (xs + dx >= 0) & (xs + dx < w) & (ys + dy >= 0) & (ys + dy < h)
            img[ys[ok] + dy, xs[ok] + dx] = color


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + 1e-9 * step:
        if t >= lo - 1e-9 * step:
            ticks.append(round(t, 10))
        t += step
    return ticks


def short_number(v: float) -> str:
    """1500 -> '1.5K', 2e6 -> '2M', 0.25 -> '0.25'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _panel(img: np.ndarray, ox: int, panel: Panel, pw: int, ph: int, top: int) -> None:
    left, right, bottom = ox + 62, ox + pw - 14, top + ph - 46
    plot_top = top + 26
    xs_all = [x for s in panel.series for x in s.xs]
    x_lo, x_hi = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    if x_hi <= x_lo:
        x_hi = x_lo + 1.0
    y_lo, y_hi = panel.ylim

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - plot_top)

    for t in nice_ticks(y_lo, y_hi, 6):
        _line(img, left, py(t), right, py(t), (230, 230, 230), 1)
        _text(img, left - 5, int(py(t)) - 3, short_number(t), anchor="right")
    for t in nice_ticks(x_lo, x_hi, 5):
        _line(img, px(t), plot_top, px(t), bottom, (230, 230, 230), 1)
        _text(img, int(px(t)), bottom + 6, short_number(t), anchor="center")
    _line(img, left, bottom, right, bottom, (0, 0, 0), 1)
    _line(img, left, plot_top, left, bottom, (0, 0, 0), 1)
    _text(img, (left + right) // 2, top + 6, panel.title, anchor="center", scale=1)
    _text(img, (left + right) // 2, bottom + 22, panel.xlabel, anchor="center")
    _text(img, ox + 4, (plot_top + bottom) // 2, panel.ylabel, vertical=True, anchor="center")
    legend: list[tuple[str, tuple[int, int, int], int]] = []
    occupied: list[tuple[float, float]] = []  # sampled drawn points, to keep the legend off them
    for j, (label, y) in enumerate(panel.hlines):
        shade = (60 + 60 * j,) * 3
        _line(img, left, py(y), right, py(y), shade, 1, dash=6)
        legend.append((label, shade, 6))
        occupied += [(x, py(y)) for x in np.linspace(left, right, 50)]
    for i, s in enumerate(panel.series):
        color = COLORS[i % len(COLORS)]
        if s.lo is not None and s.hi is not None:
            _band(img, [px(x) for x in s.xs], [py(y) for y in s.lo], [py(y) for y in s.hi], color)
        pts = [(px(x), py(y)) for x, y in zip(s.xs, s.ys)]
        for (a, b), (c, d) in zip(pts, pts[1:]):
            _line(img, a, b, c, d, color, 2)
            occupied += [(a + t * (c - a), b + t * (d - b)) for t in np.linspace(0, 1, 20)]
        for a, b in pts:
            img[max(int(b) - 2, 0): int(b) + 3, max(int(a) - 2, 0): int(a) + 3] = color
        occupied += pts
        legend.append((s.label, color, 0))
    box_w = max((6 * len(lbl) + 20 for lbl, _, _ in legend), default=0)
    box_h = 11 * len(legend)
    corners = [(right - 8 - box_w, bottom - 8 - box_h), (left + 8, plot_top + 6), (right - 8 - box_w, plot_top + 6),
               (left + 8, bottom - 8 - box_h)]
    corners += [(left + 8 + fx * (right - left - 16 - box_w), plot_top + 6 + fy * (bottom - plot_top - 14 - box_h))
                for fy in (0.2, 0.4, 0.6, 0.8) for fx in (0.0, 0.5, 1.0)]  # then a grid, if every corner is busy

    def crowding(corner: tuple[float, float]) -> int:
        x0, y0 = corner
        return sum(x0 - 4 <= x <= x0 + box_w + 4 and y0 - 4 <= y <= y0 + box_h + 4 for x, y in occupied)

    lx, ly = (int(v) for v in min(corners, key=crowding))  # the emptiest corner (first one on ties)
    img[ly - 2: ly + box_h, lx - 2: lx + box_w] = 255
    for label, color, dash in legend:
        _line(img, lx, ly + 3, lx + 14, ly + 3, color, 2, dash=dash // 2)
        _text(img, lx + 18, ly, label)
        ly += 11


def _band(img: np.ndarray, xs: Sequence[float], lo: Sequence[float], hi: Sequence[float], color) -> None:
    """Shade between two curves (pixel coordinates), a light tint of ``color``, column by column."""
    tint = tuple(int(255 - 0.22 * (255 - c)) for c in color)
    for (x0, a0, b0), (x1, a1, b1) in zip(zip(xs, lo, hi), list(zip(xs, lo, hi))[1:]):
        for x in range(int(round(x0)), int(round(x1)) + 1):
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            top, bot = sorted((a0 + t * (a1 - a0), b0 + t * (b1 - b0)))
            img[int(round(top)): int(round(bot)) + 1, x][(img[int(round(top)): int(round(bot)) + 1, x] == 255).all(-1)] = tint


def render(panels: Sequence[Panel], title: Optional[str] = None, pw: int = 520, ph: int = 380,
           columns: Optional[int] = None) -> np.ndarray:
    """The RGB image ``[H, W, 3]`` of the panels, ``columns`` per row (default: one row)."""
    cols = min(columns or len(panels), len(panels))
    rows = -(-len(panels) // cols)
    top = 18 if title else 0
    img = np.full((ph * rows + top, pw * cols, 3), 255, dtype=np.uint8)
    if title:
        _text(img, img.shape[1] // 2, 5, title, anchor="center")
    for k, panel in enumerate(panels):
        _panel(img, (k % cols) * pw, panel, pw, ph, top + (k // cols) * ph)
    return img


def write_png(path: str, rgb: np.ndarray) -> None:
    """Write an 8-bit RGB image ``[H, W, 3]`` as a PNG (no filtering, zlib level 9)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].astype(np.uint8).tobytes() for row in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def read_png(path: str) -> np.ndarray:
    """Read back a PNG written by :func:`write_png` (8-bit RGB, filter 0 only): for tests."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, (w, h) = 8, b"", (0, 0)
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos: pos + 4])
        kind, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n: pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all(), "only filter type 0 is supported"
    return raw[:, 1:].reshape(h, w, 3)
