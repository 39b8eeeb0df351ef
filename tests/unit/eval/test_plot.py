"""eval/plot.py with the real matplotlib (``pip install -e .[eval]``): what the figure holds, the PNG
it writes, the message without matplotlib; and the token-efficiency benchmark's plot and 95% crossing."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from nemo_opdlm.eval import plot as P

PANELS = [
    P.Panel("conversion", "training tokens", "held-out accuracy",
            [P.Series("static", [0, 1000, 2000], [0.1, 0.5, 0.9]),
             P.Series("dynamic", [0, 1000, 2000], [0.2, 0.4, 0.8], lo=[0.1, 0.3, 0.7], hi=[0.3, 0.5, 0.9])],
            hlines=[("teacher (AR)", 0.95), ("95% of teacher", 0.9025)]),
    P.Panel("teacher", "tokens", "accuracy", [P.Series("AR", [0, 5e6], [0.0, 1.0])], ylim=(0.0, 1.05)),
    P.Panel("third", "x", "y", [P.Series("s", [1, 2], [0.5, 0.6])]),
]


def test_short_numbers():
    assert P.short_number(1500) == "1.5K" and P.short_number(2e6) == "2M" and P.short_number(0.25) == "0.25"


def test_figure_holds_the_series_bands_reference_lines_and_labels():
    pytest.importorskip("matplotlib")
    fig = P.figure(PANELS, title="accuracy vs training tokens", columns=2)
    axes = fig.axes
    assert len(axes) == 4 and not axes[3].axison  # 3 panels on a 2 x 2 grid, the spare one hidden
    assert fig.get_size_inches().tolist() == [11.0, 8.4]
    assert fig.get_suptitle() == "accuracy vs training tokens"
    ax = axes[0]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ax.get_ylim()) == (
        "conversion", "training tokens", "held-out accuracy", (0.0, 1.0))
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["static", "dynamic", "teacher (AR)", "95% of teacher"]
    assert lines["static"].get_xdata().tolist() == [0, 1000, 2000]
    assert lines["dynamic"].get_ydata().tolist() == [0.2, 0.4, 0.8]
    assert list(lines["teacher (AR)"].get_ydata()) == [0.95, 0.95] and lines["teacher (AR)"].get_linestyle() == "--"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)
    # one band (the series with lo/hi), spanning exactly [lo, hi]
    (band,) = ax.collections
    verts = np.concatenate([p.vertices for p in band.get_paths()])
    assert verts[:, 1].min() == pytest.approx(0.1) and verts[:, 1].max() == pytest.approx(0.9)
    assert axes[1].get_ylim() == (0.0, 1.05)
    assert axes[1].xaxis.get_major_formatter()(5e6, 0) == "5M"  # token counts read as 5M, not 5000000


def test_save_writes_a_png_of_the_figure_size(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    path = str(tmp_path / "p.png")
    assert P.save_line_plot(path, PANELS[:2], title="t", dpi=50) == path
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (round(4.2 * 50), round(11.0 * 50))  # one row of two 5.5 x 4.2 in panels
    assert (img[..., :3] < 0.5).any()  # something dark was drawn


def test_without_matplotlib_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = str(tmp_path / "p.png")
    assert P.save_line_plot(path, PANELS) is None
    assert not os.path.exists(path)
    assert capsys.readouterr().err.strip() == (
        f"matplotlib is not installed: no plot written to {path} (`pip install -e .[eval]`)")


def test_token_efficiency_plot_from_the_committed_results(tmp_path):
    """benchmarks/token_efficiency.py's plot of its committed result file: one panel per task and
    decoding mode, one line per method, the teacher and 95%-of-teacher lines."""
    pytest.importorskip("matplotlib")
    from benchmarks import token_efficiency as B

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    with open(os.path.join(root, "benchmarks", "results", "token_efficiency.json")) as f:
        result = json.load(f)
    png = str(tmp_path / "te.png")
    assert B.plot(result, png) == os.path.relpath(png, B.ROOT)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_tokens_to_reach_interpolates():
    from benchmarks.token_efficiency import tokens_to_reach

    curve = [(0, 0.0), (100, 0.4), (200, 0.8), (300, 0.9)]
    assert tokens_to_reach(curve, 0.6) == 150
    assert tokens_to_reach(curve, 0.0) == 0
    assert tokens_to_reach(curve, 0.95) is None
    assert tokens_to_reach(curve, 0.9) == 300
