"""Line plots of accuracy against training tokens, drawn with matplotlib (the ``eval`` extra).

One job: draw one or more panels of named (x, y) series, each with an optional min/max band, plus
horizontal reference lines (the teacher's accuracy), to a PNG file. The figure is built on a
``matplotlib.figure.Figure`` (no pyplot, so no global figure state and no backend switch). Without
matplotlib nothing is drawn: one plain line on stderr says so and how to install it, and the caller
gets ``None``. Non-goals: styling beyond legible lines, ticks, labels and a legend.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MATPLOTLIB_MISSING = "matplotlib is not installed: no plot written to {path} (`pip install -e .[eval]`)"


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


def short_number(v: float) -> str:
    """Tick labels for token counts: 1500 -> '1.5K', 2e6 -> '2M', 0.25 -> '0.25'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def figure(panels: Sequence[Panel], title: Optional[str] = None, columns: Optional[int] = None) -> "Figure":
    """The matplotlib figure of the panels, ``columns`` per row (default: all in one row)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    cols = min(columns or len(panels), len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(5.5 * cols, 4.2 * rows), layout="tight")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        for i, s in enumerate(panel.series):
            color = f"C{i}"
            if s.lo is not None and s.hi is not None:
                ax.fill_between(s.xs, s.lo, s.hi, color=color, alpha=0.18, lw=0)
            ax.plot(s.xs, s.ys, marker="o", ms=3, label=s.label, color=color)
        for j, (label, y) in enumerate(panel.hlines):
            ax.axhline(y, ls="--", lw=1, color="k", alpha=0.6 - 0.2 * j, label=label)
        ax.set_title(panel.title)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: short_number(v)))
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_ylim(*panel.ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return fig


def save_line_plot(path: str, panels: Sequence[Panel], title: Optional[str] = None,
                   columns: Optional[int] = None, dpi: int = 110) -> Optional[str]:
    """Write the panels to ``path`` as a PNG and return ``path``; without matplotlib, say so on
    stderr and return None (the numbers the plot would show are in the caller's JSON)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(MATPLOTLIB_MISSING.format(path=path), file=sys.stderr)
        return None
    figure(panels, title, columns).savefig(path, dpi=dpi)
    return path
