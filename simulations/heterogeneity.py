"""How non-IID a federation is: per-client size, label rate and covariate drift.

The drift statistic of a client is the root-mean-square, over features, of the
standardised difference between the client's feature mean and the pooled mean
(a per-feature effect size, as in Cohen's d, averaged in quadrature). 0 means the
client looks like the federation on average; 0.2 is a small shift per feature, 0.5 a
medium one. Quantity skew is summarised by the Gini coefficient of client sizes.
Any torch datasets of (input, target) rows will do: a table, images, a regression.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset

from fedmodel.data import dataset_tensors

if TYPE_CHECKING:
    from fedmodel.task import MetricKind


POSITIVES, COMMONEST_CLASS, MEAN_TARGET = (
    "share of positives",
    "share of the commonest class",
    "mean target",
)


def heterogeneity(clients: Sequence[Dataset], kind: MetricKind | None = None) -> dict[str, Any]:
    """Per-client statistics and federation-level summaries (JSON-ready), of any datasets.

    Inputs are flattened to one feature per value (an image's pixels). The label rate is
    the share of positives for a binary task, the share of the client's commonest class
    for a multiclass one and the mean target for a regression (`label_rate_is` says
    which); with no `kind` (a task with its own metrics) the targets' values decide.
    """
    parts = [_inputs_and_targets(client) for client in clients]
    sizes = np.array([len(targets) for _, targets in parts], dtype=float)
    total = sizes.sum()
    mean = sum(inputs.sum(axis=0) for inputs, _ in parts) / total
    squares = sum(np.square(inputs).sum(axis=0) for inputs, _ in parts) / total
    std = np.sqrt(np.maximum(squares - mean**2, 0.0))
    std = np.where(std > 1e-12, std, 1.0)
    label_rate_is = _label_rate_is(kind, np.concatenate([targets for _, targets in parts]))
    rows = []
    for index, (inputs, targets) in enumerate(parts):
        shift = (inputs.mean(axis=0) - mean) / std
        rows.append(
            {
                "client": str(index),
                "rows": len(targets),
                "label_rate": _label_rate(targets, label_rate_is),
                "classes": None if label_rate_is == MEAN_TARGET else len(np.unique(targets)),
                "drift": float(np.sqrt(np.mean(np.square(shift)))),
            }
        )
    rates = np.array([row["label_rate"] for row in rows])
    return {
        "clients": rows,
        "label_rate_is": label_rate_is,
        "size_gini": _gini(sizes),
        "size_max_over_median": float(sizes.max() / np.median(sizes)),
        "label_rate_sd": float(rates.std()),
        "mean_drift": float(np.mean([row["drift"] for row in rows])),
    }


def _inputs_and_targets(client: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """A client's inputs as (rows, values) and its targets as one value per row, float64."""
    inputs, targets = dataset_tensors(client)
    return (
        inputs.reshape(len(inputs), -1).double().numpy(),
        targets.reshape(len(targets), -1)[:, 0].double().numpy(),
    )


def _label_rate_is(kind: MetricKind | None, targets: np.ndarray) -> str:
    """What a label rate measures for `kind`; without one, 0/1 targets are binary,
    other non-negative whole numbers classes, anything else continuous."""
    if kind is None:
        if np.isin(targets, (0.0, 1.0)).all():
            kind = "binary"
        elif (targets == np.round(targets)).all() and targets.min() >= 0:
            kind = "multiclass"
        else:
            kind = "regression"
    return {"binary": POSITIVES, "multiclass": COMMONEST_CLASS, "regression": MEAN_TARGET}[kind]


def _label_rate(targets: np.ndarray, label_rate_is: str) -> float:
    if label_rate_is == COMMONEST_CLASS:
        return float(np.bincount(targets.astype(np.int64)).max() / len(targets))
    return float(targets.mean())  # the share of positives of 0/1 targets, or the mean target


def _gini(values: np.ndarray) -> float:
    """0 when every client holds the same number of rows; towards 1 when one holds all."""
    ordered = np.sort(values)
    n = len(ordered)
    if n == 0 or ordered.sum() == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float((2 * np.sum(ranks * ordered) / (n * ordered.sum())) - (n + 1) / n)
