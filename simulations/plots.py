"""The report's plots: Figures a test can measure, and the PNGs the report links.

Readable at 1 site and at hundreds: rounds are whole numbers, no axis carries more than
MAX_TICKS + 1 labels, and every site the report's tables name is named in each per-site
plot, in its legend or beside its point. Beyond TABLE_CLIENTS sites the others are a
min-to-max band (epsilon) or unlabelled points (heterogeneity).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from matplotlib.transforms import Bbox

from fedmodel.plotting import MAX_TICKS, new_figure, round_axis, save
from fedmodel.run_directory import RunSummary
from simulations.heterogeneity import COMMONEST_CLASS, POSITIVES
from simulations.sites import TABLE_CLIENTS, named_clients, site_name, table_clients

BASELINE_LINES = (  # (baselines key, legend label, line style, colour)
    ("central", "central, no DP", ":", "0.2"),
    ("central_dp", "central, DP", "--", "C2"),
    ("local_mean", "site alone, mean", "-.", "C1"),
)
RATE_MINIMUM_SPAN = 0.1  # label rates 0.410-0.423 are drawn as the near-equal rates they are
LABEL_RINGS = (20, 32, 46, 62, 80)  # points from a labelled point to its label, nearest first
LABEL_LINE = 12  # points from one name to the next in a column of names
COLUMN_GAP = 48  # points from the crowded points to their column of names
MARKER_RADIUS = 4  # points: the ring that marks a labelled point (s=60)
LABEL_DIRECTIONS = 16  # angles tried on each ring, from the upper right round


def write_plots(run_dir: Path, summary: RunSummary) -> list[str]:
    """Write every plot of `summary` into `run_dir`; returns their file names."""
    figures = figures_of(summary)
    for name, figure in figures.items():
        save(figure, run_dir / name)
    return list(figures)


def figures_of(summary: RunSummary) -> dict[str, Figure]:
    """The report's figures by file name: the headline metric per round (auroc.png for a
    classifier), epsilon.png under DP, heterogeneity.png where the harness measured it."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", summary.scoring.headline) + ".png"
    figures = {name: headline_figure(summary)}
    if summary.dp:
        figures["epsilon.png"] = epsilon_figure(summary)
    if summary.heterogeneity:
        figures["heterogeneity.png"] = heterogeneity_figure(summary)
    return figures


def headline_figure(summary: RunSummary) -> Figure:
    """The global model's headline metric per round, beside the baselines' (flat lines)."""
    headline, label = summary.scoring.headline, summary.scoring.headline_label
    rounds = [row["round"] for row in summary.per_round]
    values = [math.nan if row.get(headline) is None else row[headline] for row in summary.per_round]
    figure, axis = new_figure()
    marker = "o" if len(rounds) <= 50 else None
    axis.plot(rounds, values, marker=marker, label="federated")
    for key, name, style, colour in BASELINE_LINES:
        value = ((summary.baselines or {}).get(key) or {}).get(headline)
        if value is not None:
            axis.axhline(value, color=colour, linestyle=style, linewidth=1.2, label=name)
    round_axis(axis, max(rounds, default=1))
    axis.yaxis.set_major_locator(MaxNLocator(MAX_TICKS))
    axis.set(xlabel="round", ylabel=f"test {label}", title=f"Global model {label} per round")
    axis.grid(alpha=0.3)
    if summary.baselines:
        axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def epsilon_figure(summary: RunSummary) -> Figure:
    """Epsilon spent per client and round, a line per client the report names; with more
    clients than that, every client's spread as a min-to-max band and its median."""
    named = table_clients(summary)
    last = max((p[0] for c in summary.clients for p in c["epsilon_by_round"]), default=1)
    figure, axis = new_figure(7.5, 4.0)
    if len(named) < len(summary.clients):
        spent = _spent_by_round(summary.clients, last)
        rounds = np.arange(1, last + 1)
        axis.fill_between(
            rounds, spent.min(axis=0), spent.max(axis=0), color="0.85",
            label=f"all {len(summary.clients)} clients, min to max",
        )  # fmt: skip
        axis.plot(rounds, np.median(spent, axis=0), color="0.45", label="median client")
    for index, client in enumerate(named):
        points = client["epsilon_by_round"]
        axis.plot(
            [p[0] for p in points], [p[1] for p in points],
            color=f"C{index % 10}", linestyle="-" if index < 10 else "--", marker="o", markersize=3,
            label=site_name(summary, client["client"]),
        )  # fmt: skip
    if summary.target_epsilon is not None:
        axis.axhline(summary.target_epsilon, color="red", linestyle="--", label="target")
    round_axis(axis, last)
    axis.yaxis.set_major_locator(MaxNLocator(MAX_TICKS))
    axis.set_ylim(bottom=0.0)
    axis.set(xlabel="round", ylabel="epsilon", title="Epsilon spent per client")
    axis.grid(alpha=0.3)
    axis.legend(
        title="client", fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
    )  # fmt: skip
    figure.tight_layout()
    return figure


def _spent_by_round(clients: Sequence[dict], last: int) -> np.ndarray:
    """Each client's epsilon after every round 1..`last` (clients x rounds): a round it
    sat out keeps what it had spent, 0 before its first."""
    spent = np.zeros((len(clients), last))
    for row, client in enumerate(clients):
        for server_round, epsilon in client["epsilon_by_round"]:
            spent[row, server_round - 1 :] = epsilon
    return spent


def heterogeneity_figure(summary: RunSummary) -> Figure:
    """Client size against label rate, coloured by covariate drift, sites named beside
    their points: every site up to TABLE_CLIENTS, else those the report names and the
    extremes of drift and label rate."""
    statistics = summary.heterogeneity
    assert statistics, "only for a summary with heterogeneity"
    rows = statistics["clients"]
    sizes = np.array([row["rows"] for row in rows], dtype=float)
    rates = np.array([row["label_rate"] for row in rows], dtype=float)
    drift = np.array([row["drift"] for row in rows], dtype=float)
    figure, axis = new_figure(7.0, 4.5)
    points = axis.scatter(sizes, rates, c=drift, cmap="viridis", s=36 if len(rows) <= 20 else 14)
    figure.colorbar(points, label="covariate drift (RMS effect size)")
    logarithmic = _size_axis(axis, sizes)
    rate_is = statistics["label_rate_is"]
    if rate_is in (POSITIVES, COMMONEST_CLASS):
        axis.set_ylim(*_padded(rates.min(), rates.max(), RATE_MINIMUM_SPAN, (-0.03, 1.03)))
    else:
        scale = max(abs(rates.min()), abs(rates.max())) or 1.0
        axis.set_ylim(*_padded(rates.min(), rates.max(), 0.1 * scale, (-math.inf, math.inf)))
    axis.yaxis.set_major_locator(MaxNLocator(MAX_TICKS))
    axis.set(
        xlabel="training rows" + (" (log scale)" if logarithmic else ""),
        ylabel=f"label rate ({rate_is})",
        title=f"{len(rows)} client{'s' if len(rows) != 1 else ''}: size Gini "
        f"{statistics['size_gini']:.2f}, label-rate sd {statistics['label_rate_sd']:.3f}",
    )
    axis.grid(alpha=0.3)
    figure.tight_layout()
    if len(rows) <= TABLE_CLIENTS:
        labelled = list(range(len(rows)))
    else:
        index = {row["client"]: i for i, row in enumerate(rows)}
        named = [index[client] for client in named_clients(summary) if client in index]
        extremes = [int(np.argmax(drift)), int(np.argmin(rates)), int(np.argmax(rates))]
        labelled = list(dict.fromkeys(named + extremes))
    axis.scatter(sizes[labelled], rates[labelled], s=60, facecolors="none", edgecolors="black",
                 linewidths=0.8)  # fmt: skip
    _label_points(
        figure,
        axis,
        [(sizes[i], rates[i], site_name(summary, rows[i]["client"])) for i in labelled],
    )
    return figure


def _size_axis(axis: Axes, sizes: np.ndarray) -> bool:
    """Client sizes on x: a log scale when they span a decade or more (True), else a
    linear one padded so that near-equal sizes do not crowd their tick labels."""
    low, high = float(sizes.min()), float(sizes.max())
    if high < 10 * low:
        axis.set_xlim(*_padded(low, high, 0.2 * high, (0.0, math.inf)))
        axis.xaxis.set_major_locator(MaxNLocator(MAX_TICKS, integer=True))
        return False
    axis.set_xscale("log")
    axis.set_xlim(low / 1.5, high * 1.5)
    subs = (1.0, 2.0, 5.0) if high < 1000 * low else (1.0,)
    axis.xaxis.set_major_locator(LogLocator(subs=subs, numticks=MAX_TICKS))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(NullFormatter())
    return True


def _padded(
    low: float, high: float, minimum_span: float, bounds: tuple[float, float]
) -> tuple[float, float]:
    """Axis limits around [low, high]: at least `minimum_span` wide plus a margin, moved
    (not shrunk) to stay within `bounds` where they allow."""
    span = max(high - low, minimum_span)
    start, end = (low + high - 1.2 * span) / 2, (low + high + 1.2 * span) / 2
    if start < bounds[0]:
        start, end = bounds[0], end + bounds[0] - start
    if end > bounds[1]:
        start, end = max(bounds[0], start - (end - bounds[1])), bounds[1]
    return start, end


def _label_points(figure: Figure, axis: Axes, labelled: list[tuple[float, float, str]]) -> None:
    """Write each name beside its point, on a leader line. Points too close to hold their
    names beside them (sites of equal size and label rate) get a column of names, in the
    points' vertical order so that no two leader lines cross; others the nearest place
    on rings around the point that covers no other name and no labelled point. Call once
    the layout is final (positions are measured)."""
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    frame = axis.get_window_extent(renderer)
    centres = axis.transData.transform([(x, y) for x, y, _ in labelled])
    line = LABEL_LINE * figure.dpi / 72
    if np.ptp(centres[:, 1]) < len(labelled) * line:
        _label_column(axis, renderer, frame, labelled, centres, line)
        return
    taken = [_marker_box(axis, x, y) for x, y, _ in labelled]  # no name hides a named point
    for x, y, name in labelled:
        for offset in _label_offsets():
            label, box = _annotate(axis, renderer, (x, y), name, offset)
            inside = (
                frame.x0 <= box.x0 <= box.x1 <= frame.x1
                and frame.y0 <= box.y0 <= box.y1 <= frame.y1
            )
            if inside and not any(box.overlaps(other) for other in taken):
                break
            label.remove()
        else:  # nowhere free: beside the point, over whatever is there
            _, box = _annotate(axis, renderer, (x, y), name, (LABEL_RINGS[0], 0.0))
        taken.append(box)


def _label_column(
    axis: Axes, renderer: RendererBase, frame: Bbox, labelled: list[tuple[float, float, str]],
    centres: np.ndarray, line: float,
) -> None:  # fmt: skip
    """The names of crowded points one per line in a column beside them (right of them
    where the axes leave room, else left), top to bottom in the points' order."""
    order = np.argsort(-centres[:, 1], kind="stable")
    gap = COLUMN_GAP * line / LABEL_LINE
    column_x = centres[:, 0].max() + gap
    side = 1.0 if column_x < frame.x1 - 0.25 * frame.width else -1.0
    if side < 0:
        column_x = centres[:, 0].min() - gap
    top = min(centres[:, 1].mean() + line * (len(labelled) - 1) / 2, frame.y1 - line)
    top = max(top, frame.y0 + line * len(labelled))
    for rank, index in enumerate(order):
        x, y, name = labelled[index]
        dx = (column_x - centres[index, 0]) * 72 / axis.figure.dpi
        dy = (top - rank * line - centres[index, 1]) * 72 / axis.figure.dpi
        _annotate(axis, renderer, (x, y), name, (side * abs(dx), dy), "center")


def _marker_box(axis: Axes, x: float, y: float) -> Bbox:
    """Where the ring around a labelled point is drawn, on the canvas."""
    centre_x, centre_y = axis.transData.transform((x, y))
    radius = MARKER_RADIUS * axis.figure.dpi / 72
    return Bbox.from_extents(
        centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius
    )


def _label_offsets() -> Iterator[tuple[float, float]]:
    """Where a label may go, in points from its point: nearest ring first."""
    for radius in LABEL_RINGS:
        for step in range(LABEL_DIRECTIONS):
            angle = math.pi / 4 + 2 * math.pi * step / LABEL_DIRECTIONS
            yield radius * math.cos(angle), radius * math.sin(angle)


def _annotate(
    axis: Axes, renderer: RendererBase, point: tuple[float, float], name: str,
    offset: tuple[float, float], va: str | None = None,
) -> tuple[Annotation, Bbox]:  # fmt: skip
    """`name` at `offset` points from `point`, away from it on a leader line (aligned
    vertically by `va`, else away from the point too), and its text's extent."""
    dx, dy = offset
    label = axis.annotate(
        name, point, xytext=offset, textcoords="offset points", fontsize="small",
        ha="left" if dx > 1 else "right" if dx < -1 else "center",
        va=va or ("bottom" if dy > 1 else "top" if dy < -1 else "center"),
        bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
              "alpha": 0.75},
        arrowprops={"arrowstyle": "-", "color": "0.3", "linewidth": 0.7, "shrinkB": 4},
    )  # fmt: skip
    label.update_positions(renderer)
    return label, Text.get_window_extent(label, renderer)
