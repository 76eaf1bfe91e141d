"""The report's plots stay readable at 1, 8 and 200 sites (issue 21).

Measured on the figures themselves, with matplotlib's own text extents: no two tick
labels overlap, no axis carries more than 30 of them, rounds are whole numbers, and every
site the report's tables name can be found in each per-site plot (beside its point or
in the legend). The summaries are synthetic, built as tests/test_report.py builds its
own: no training needed.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import pytest
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text

from fedmodel.privacy.audit import OwnerAudit, owner_figure
from fedmodel.run_directory import RunSummary
from simulations.baselines import compare_to_baselines
from simulations.heterogeneity import POSITIVES
from simulations.plots import figures_of
from simulations.report import baseline_rows, privacy_rows

MAX_TICK_LABELS = 30
ROUNDS = {1: 1, 8: 3, 200: 60}  # 3 rounds drew ticks at 1.5 and 2.5; 60 would draw 60


def scores(auroc: float) -> dict[str, Any]:
    return {"auroc": auroc, "auprc": auroc - 0.2, "recall_at_1pct_fpr": 0.1, "accuracy": 0.7,
            "loss": 1 - auroc}  # fmt: skip


def federation_summary(sites: int) -> RunSummary:
    """`sites` named sites over ROUNDS[sites] rounds. 8 sites are the issue's: equal sizes
    and label rates 0.410-0.423. 200 sites are skewed (log-normal sizes), each sampled
    in a third of the rounds, spending epsilon in proportion to its rounds."""
    rng = np.random.default_rng(sites)
    rounds = ROUNDS[sites]
    names = ["north", "south", "east", "west", "centre", "coast", "hills", "valley"]
    names = names[:sites] if sites <= len(names) else [f"clinic-{i:03d}" for i in range(sites)]
    if sites == 8:
        sizes = 788 + rng.integers(-6, 7, sites)  # drew a band of x labels on a log axis
        rates = np.linspace(0.410, 0.423, sites)
    else:
        sizes = np.maximum(20, rng.lognormal(5.5, 1.2, sites)).astype(int)
        rates = rng.beta(4, 6, sites)
    clients = []
    for index in range(sites):
        trained = [r for r in range(1, rounds + 1) if sites < 200 or rng.random() < 1 / 3]
        spent = [[r, 0.99 * (k + 1) / rounds] for k, r in enumerate(trained)]
        clients.append(
            {"client": str(index), "num_examples": int(sizes[index]), "delta": 1e-5,
             "epsilon": spent[-1][1] if spent else 0.0, "accountant": "rdp",
             "history": [[1.1, 0.05, 20 * len(trained)]], "epsilon_by_round": spent}
        )  # fmt: skip
    final = scores(0.80)
    worst = int(np.argmin(sizes))
    baselines: dict[str, Any] = {
        "central": scores(0.85), "central_dp": scores(0.82) | {"epsilon": 0.99},
        "local_mean": scores(0.70), "local_worst": scores(0.6) | {"client": str(worst),
        "epsilon": 0.99}, "local_sites": sites, "local_sites_total": sites,
    }  # fmt: skip
    baselines["comparison"] = compare_to_baselines(final, baselines, "auroc")
    return RunSummary(
        scenario="medical", dataset="synthetic", rounds=rounds, planned_rounds=rounds,
        completed=True, num_clients=sites, dp=True, delta=1e-5, target_epsilon=1.0,
        accountant="rdp", final=final, initial=scores(0.5),
        per_round=[
            {"round": r, **scores(0.6 + 0.2 * r / rounds), "train_loss": 0.5,
             "max_epsilon": 0.99 * r / rounds, "clients": sites}
            for r in range(1, rounds + 1)
        ],
        clients=clients, config={}, baselines=baselines,
        federation={"site_names": names},
        heterogeneity={
            "clients": [
                {"client": str(i), "rows": int(sizes[i]), "label_rate": float(rates[i]),
                 "classes": 2, "drift": float(rng.uniform(0.02, 0.4))}
                for i in range(sites)
            ],
            "label_rate_is": POSITIVES, "size_gini": 0.3, "size_max_over_median": 2.0,
            "label_rate_sd": float(rates.std()), "mean_drift": 0.1,
        },
    )  # fmt: skip


def shown_tick_labels(axis: Axis) -> list[Text]:
    """The tick labels drawn on `axis`: ticks inside its view, with text."""
    low, high = sorted(axis.get_view_interval())
    slack = (high - low) * 1e-9
    ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
    return [
        tick.label1
        for tick in ticks
        if low - slack <= tick.get_loc() <= high + slack
        and tick.label1.get_visible()
        and tick.label1.get_text()
    ]


def assert_ticks_readable(name: str, figure: Figure) -> None:
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    for axes, axis in itertools.product(figure.axes, ("xaxis", "yaxis")):
        labels = shown_tick_labels(getattr(axes, axis))
        assert len(labels) <= MAX_TICK_LABELS, f"{name} {axis}: {len(labels)} tick labels"
        boxes = [(label.get_text(), label.get_window_extent(renderer)) for label in labels]
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
            assert not box_a.overlaps(box_b), f"{name} {axis}: tick labels {a} and {b} overlap"


def texts(figure: Figure) -> set[str]:
    """Every text the figure draws: titles, annotations, legend entries."""
    return {text.get_text() for text in figure.findobj(Text)}


def report_site_names(summary: RunSummary) -> list[str]:
    """The sites the report's tables name (report.md and the CLI print these rows): the
    privacy table's first column and the baseline table's worst site."""
    named = [row[0] for row in privacy_rows(summary)]
    return named + [m for row in baseline_rows(summary) for m in re.findall(r"worst: (.+)", row[0])]


@pytest.mark.parametrize("sites", [1, 8, 200])
def test_plots_are_readable_and_name_every_site_the_report_names(
    sites: int,
) -> None:
    summary = federation_summary(sites)
    named = report_site_names(summary)
    assert len(named) == sites + 1 if sites <= 20 else 4 <= len(named) <= 7  # + worst alone
    figures = figures_of(summary)
    assert {"auroc.png", "epsilon.png", "heterogeneity.png"} == set(figures)
    for name, figure in figures.items():
        assert_ticks_readable(name, figure)
    for name in ("auroc.png", "epsilon.png"):
        rounds = [t.get_text() for t in shown_tick_labels(figures[name].axes[0].xaxis)]
        assert rounds and all(t.isdigit() for t in rounds), f"{name} rounds: {rounds}"
    assert {"central, no DP", "central, DP", "site alone, mean"} <= texts(figures["auroc.png"])
    for name in ("epsilon.png", "heterogeneity.png"):
        missing = set(named) - texts(figures[name])
        assert not missing, f"{name} does not name {sorted(missing)}"
    heterogeneity = figures["heterogeneity.png"].axes[0]
    labels = [t for t in heterogeneity.texts if isinstance(t, Annotation)]
    renderer = figures["heterogeneity.png"].canvas.get_renderer()  # type: ignore[attr-defined]
    boxes = [Text.get_window_extent(label, renderer) for label in labels]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    low, high = heterogeneity.get_ylim()
    assert high - low >= 0.1, "label rates 0.410-0.423 drawn as near-equal, not stretched"


def test_a_200_site_report_lists_the_sites_that_bound_the_spread() -> None:
    summary = federation_summary(200)
    rows = privacy_rows(summary)
    assert 3 <= len(rows) <= 6
    epsilons = [client["epsilon"] for client in summary.clients]
    sizes = [client["num_examples"] for client in summary.clients]
    assert {f"{min(epsilons):.3f}", f"{max(epsilons):.3f}"} <= {row[2] for row in rows}
    assert {str(min(sizes)), str(max(sizes))} <= {row[1] for row in rows}
    assert all(row[0].startswith("clinic-") for row in rows)  # site names, not numbers


def test_audit_epsilon_plot_counts_whole_rounds_across_runs() -> None:
    timeline = [
        {"run_id": "a" if r <= 30 else "b", "epsilon": 0.02 * r,
         "pld_epsilon": 0.015 * r if r in (30, 45) else None}
        for r in range(1, 46)
    ]  # fmt: skip
    owner = OwnerAudit(
        ledger="ledgers/client-0.sqlite", owner="client-0", fingerprint="f", delta=1e-5,
        budget_epsilon=1.0, spent_epsilon=0.9, pld_epsilon=0.7, remaining=0.1, rounds=45,
        runs=2, uncommitted=0, history=[], timeline=timeline,
    )  # fmt: skip
    figure = owner_figure(owner)
    assert_ticks_readable("audit", figure)
    rounds = [t.get_text() for t in shown_tick_labels(figure.axes[0].xaxis)]
    assert rounds and all(t.isdigit() for t in rounds), rounds
