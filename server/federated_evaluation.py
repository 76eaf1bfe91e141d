"""Combining the nodes' scores of a global model into the federation's, bounded per node.

In deployment the server has no test set: each node scores the model on its own
held-out rows and reports loss, accuracy, AUROC and how many rows they rest on. Those
counts are the node's word, so each is capped (`cap`: 1 for uniform weights, or the
rows the operator vouched for): a node cannot buy the federation's AUROC by reporting
a vast hold-out. `median` takes the per-metric median over the nodes instead, which a
minority of nodes cannot move past the honest nodes' range (Yin et al. 2018,
"Byzantine-Robust Distributed Learning", coordinate-wise median).

The AUROC is a combination of the nodes' local AUROCs, not the AUROC of the pooled
hold-outs (that would need every score on the server); it rests only on nodes where
it is defined (`auroc_weight` > 0).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from fedmodel.config import EVALUATION_METHODS
from server.reply_schema import EvaluationReport

SCORES = ("auroc", "accuracy", "loss")


def combine_evaluations(
    reports: Sequence[tuple[EvaluationReport, int]], method: str = "mean"
) -> dict[str, float]:
    """The federation's scores from (node's report, node's weight cap) pairs.

    A score no node can speak to (all hold-outs empty, AUROC undefined everywhere) is 0.
    """
    if method not in EVALUATION_METHODS:
        raise ValueError(f"unknown evaluation method {method!r}")
    rows = [(report, min(report.num_examples, cap)) for report, cap in reports]
    curves = [(report, min(report.auroc_weight, cap)) for report, cap in reports]
    scored = {
        "loss": [(report.loss, weight) for report, weight in rows],
        "accuracy": [(report.accuracy, weight) for report, weight in rows],
        "auroc": [(report.auroc, weight) for report, weight in curves],
    }
    combine = _median if method == "median" else _mean
    return {name: combine([(value, w) for value, w in scored[name] if w > 0]) for name in SCORES}


def _mean(values: list[tuple[float, int]]) -> float:
    total = sum(weight for _, weight in values)
    return sum(value * weight for value, weight in values) / total if total else 0.0


def _median(values: list[tuple[float, int]]) -> float:
    return float(statistics.median(value for value, _ in values)) if values else 0.0
