"""The PNG writer/rasteriser behind the demo's and benchmark's plots, and the benchmark's 95% crossing."""

from __future__ import annotations

import zlib

import numpy as np

from nemo_opdlm.eval import plot as P


def test_png_round_trip_and_zlib_stream(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    path = str(tmp_path / "x.png")
    P.write_png(path, img)
    assert np.array_equal(P.read_png(path), img)
    data = open(path, "rb").read()
    assert data[12:16] == b"IHDR" and int.from_bytes(data[16:20], "big") == 11  # width
    start = data.index(b"IDAT") + 4
    raw = zlib.decompress(data[start: start + int.from_bytes(data[start - 8: start - 4], "big")])
    assert len(raw) == 7 * (1 + 11 * 3)


def test_nice_ticks_and_short_numbers():
    assert P.nice_ticks(0, 1, 6) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert P.nice_ticks(0, 23000, 5) == [0, 5000, 10000, 15000, 20000]
    assert P.short_number(1500) == "1.5K" and P.short_number(2e6) == "2M" and P.short_number(0.25) == "0.25"


def test_render_draws_series_where_the_axes_say(tmp_path):
    panel = P.Panel("t", "x", "y", [P.Series("a", [0, 10], [0.0, 1.0])], hlines=[("ref", 0.5)])
    img = P.render([panel], title="title")
    blue = np.all(img == np.array(P.COLORS[0], dtype=np.uint8), axis=-1)
    ys, xs = np.nonzero(blue)
    # the line rises left to right: the leftmost blue pixels are lower (larger row) than the rightmost
    assert ys[xs == xs.min()].mean() > ys[xs == xs.max()].mean()
    assert P.save_line_plot(str(tmp_path / "p.png"), [panel, panel]) in ("builtin", "matplotlib")


def test_bands_and_grid_layout():
    """A series' min/max band is shaded in a tint of its colour between the bounds only; four panels
    in two columns make a 2 x 2 image."""
    band = P.Panel("t", "x", "y", [P.Series("a", [0, 10], [0.5, 0.5], lo=[0.4, 0.4], hi=[0.6, 0.6])])
    img = P.render([band])
    tint = np.array([int(255 - 0.22 * (255 - c)) for c in P.COLORS[0]], dtype=np.uint8)
    rows = np.nonzero(np.all(img == tint, axis=-1))[0]
    line = np.nonzero(np.all(img == np.array(P.COLORS[0], dtype=np.uint8), axis=-1))[0]
    assert rows.size and rows.min() < line.mean() < rows.max()  # the band straddles the line
    assert rows.max() - rows.min() < 0.4 * img.shape[0]  # and stays within [0.4, 0.6] of the axis
    grid = P.render([band] * 4, columns=2, pw=300, ph=200)
    assert grid.shape[:2] == (400, 600)


def test_tokens_to_reach_interpolates():
    from benchmarks.token_efficiency import tokens_to_reach

    curve = [(0, 0.0), (100, 0.4), (200, 0.8), (300, 0.9)]
    assert tokens_to_reach(curve, 0.6) == 150
    assert tokens_to_reach(curve, 0.0) == 0
    assert tokens_to_reach(curve, 0.95) is None
    assert tokens_to_reach(curve, 0.9) == 300
