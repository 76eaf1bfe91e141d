"""Figures for reports and audits, drawn without pyplot.

A `Figure` on its own Agg canvas holds no global state (nothing to close, safe beside a
running server) and can be measured before it is saved: tests read its text extents.
Every per-round axis counts whole rounds, with few enough labels to stay apart.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MAX_TICKS = 10
"""Tick intervals per axis: at most MAX_TICKS + 1 labels, apart at the sizes drawn here."""

DPI = 100


def new_figure(width: float = 6.0, height: float = 4.0) -> tuple[Figure, Axes]:
    """A figure of `width` x `height` inches on an Agg canvas, and its one axis."""
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def round_axis(axis: Axes, last_round: int) -> None:
    """x counts rounds 1..`last_round`: whole numbers only (no round 1.5), at most
    MAX_TICKS + 1 of them however long the run."""
    axis.xaxis.set_major_locator(MaxNLocator(nbins=MAX_TICKS, integer=True, min_n_ticks=1))
    axis.set_xlim(0.5, max(last_round, 1) + 0.5)


def save(figure: Figure, path: Path) -> None:
    """Write `figure` as a PNG at the resolution every report uses."""
    figure.savefig(path, dpi=DPI)
