"""A sweep's outputs beside sweep.csv: best.csv, privacy_utility.png and sweep.md.

The plot sets the three arms side by side at each epsilon (mean over seeds, 95%
t-interval as error bars) on a log epsilon axis ticked at the sweep's own epsilons.
sweep.md says what was chosen and how, and that tuning is not counted in epsilon.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.ticker import FixedLocator, NullLocator

from fedmodel.plotting import new_figure, save
from fedmodel.run_directory import Scoring
from simulations.sweep_plan import ARMS, SweepDefinition, described
from simulations.sweep_results import ARM_LABELS, ArmResult, SweepOutcome

BEST_FILE, PLOT_FILE, REPORT_FILE = "best.csv", "privacy_utility.png", "sweep.md"
UNIT_INTERVAL_METRICS = frozenset({"auroc", "auprc", "accuracy", "recall_at_1pct_fpr"})
NONNEGATIVE_METRICS = UNIT_INTERVAL_METRICS | {"loss", "mse", "mae"}
OFFSET = 0.06  # each arm's shift along the log epsilon axis (a factor of 10**0.06 = 1.15)


def write_sweep_report(
    path: Path, definition: SweepDefinition, outcome: SweepOutcome, command: str
) -> None:
    """best.csv, privacy_utility.png and sweep.md for `outcome` in sweep directory `path`."""
    results, metric = outcome.results, outcome.metric
    with (path / BEST_FILE).open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["epsilon", "arm", *definition.keys, f"validation_{metric}", f"test_{metric}_mean",
             "ci95_low", "ci95_high", "seeds", "test_loss_mean"]
        )  # fmt: skip
        for result in results:
            low, high = _interval(result)
            writer.writerow(
                [f"{result.epsilon:g}", result.arm, *(value for _, value in result.config),
                 _cell(result.validation), _cell(result.mean), _cell(low), _cell(high),
                 len(result.test_scores), _cell(result.mean_loss)]
            )  # fmt: skip
    _plot(path / PLOT_FILE, definition, results, metric)
    (path / REPORT_FILE).write_text(_markdown(definition, outcome, command))


def _interval(result: ArmResult) -> tuple[float | None, float | None]:
    if result.mean is None or result.half_width is None:
        return None, None
    return result.mean - result.half_width, result.mean + result.half_width


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _validation_seeds(definition: SweepDefinition) -> str:
    if definition.validation_seeds == 1:
        return "one seed"
    return f"{definition.validation_seeds} seeds (the choice reads their mean)"


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _plot(
    path: Path, definition: SweepDefinition, results: Sequence[ArmResult], metric: str
) -> None:
    label = Scoring.label(metric)
    figure, axis = new_figure(6.5, 4.2)
    epsilons = sorted(definition.epsilons)
    for index, arm in enumerate(ARMS):
        points = sorted(
            (r.epsilon, r.mean, r.half_width or 0.0)
            for r in results
            if r.arm == arm and r.mean is not None
        )
        if not points:
            continue
        x, y, error = (np.array(column) for column in zip(*points, strict=True))
        shifted = x * 10 ** ((index - 1) * OFFSET)  # side by side, not on top of each other
        axis.errorbar(shifted, y, yerr=error, marker="o", capsize=4, label=ARM_LABELS[arm])
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(FixedLocator(epsilons))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.set_xticklabels([f"{epsilon:g}" for epsilon in epsilons])
    axis.set_xlim(epsilons[0] / 1.6, epsilons[-1] * 1.6)
    axis.set_xlabel("epsilon (per client, delta fixed)")
    low, high = axis.get_ylim()  # a few seeds' t-interval can reach values the metric cannot
    if metric in NONNEGATIVE_METRICS:
        low = max(0.0, low)
    if metric in UNIT_INTERVAL_METRICS:
        high = min(1.0, high)
    axis.set_ylim(low, high)
    axis.set_ylabel(f"test {label}")
    seeds = _count(len(definition.seeds), "seed")
    axis.set_title(f"{definition.scenario}: mean over {seeds}, 95% t-interval")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    save(figure, path)


def _markdown(definition: SweepDefinition, outcome: SweepOutcome, command: str) -> str:
    results, metric = outcome.results, outcome.metric
    label = Scoring.label(metric)
    seeds = len(definition.seeds)
    lines = [
        f"# Sweep: {definition.scenario}",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        f"Stage 1 ran {_count(len(definition.configs()), 'configuration')} of the grid at "
        f"each epsilon, {_validation_seeds(definition)}, each scored on a validation split "
        f"({definition.validation_fraction:g} of each client's training rows, held out); the "
        "test set was not read. Each arm (federated, central DP, site alone) took its own "
        f"best configuration by validation {label}. Stage 2 reran those with "
        f"{_count(seeds, 'seed')} on the full training rows, scored on the test set: the "
        "mean and the 95% t-interval over seeds below, and in privacy_utility.png. Every "
        "run is in sweep.csv; the choices in best.csv.",
        "",
        f"| epsilon | arm | configuration | validation {label} | test {label} [95% CI] "
        "| test log-loss (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        low, high = _interval(result)
        test = (
            "-"
            if result.mean is None
            else f"{result.mean:.4f}" + (f" [{low:.4f}, {high:.4f}]" if low is not None else "")
        )
        lines.append(
            f"| {result.epsilon:g} | {ARM_LABELS[result.arm]} | {described(result.config)} | "
            f"{_cell(result.validation) or '-'} | {test} | {_cell(result.mean_loss) or '-'} |"
        )
    if metric != "loss":
        lines += [
            "",
            f"The log-loss says how good the probabilities are, which a choice by {label} "
            "does not see: a setting that ranks better can give overconfident probabilities "
            "(--metric loss chooses by it).",
        ]
    if outcome.constant_loss is not None:
        lines += [
            "",
            "No model at all, every test row given the one output that best fits the training "
            "rows (for a yes/no outcome, their base rate), scores a test log-loss of "
            f"{outcome.constant_loss:.4f}: a log-loss above that is worse than no model.",
        ]
    lines += [
        "",
        "## Tuning is not counted in epsilon",
        "",
        "Each epsilon above is what one training run spends. Choosing the best of many runs "
        "on the clients' data spends privacy too, and that is not included: the selection "
        'itself can leak (Papernot and Steinke 2022, "Hyperparameter Tuning with Renyi '
        'Differential Privacy", bound the extra cost). Read these numbers as what settings '
        "chosen in advance (e.g. on public or synthetic data, or as built-in defaults) "
        "achieve, not as the guarantee of a pipeline that tunes on private data.",
        "",
    ]
    return "\n".join(lines)
