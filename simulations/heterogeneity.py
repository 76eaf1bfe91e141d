"""How non-IID a federation is: per-client size, label rate and covariate drift, plus a plot.

The drift statistic of a client is the root-mean-square, over features, of the
standardised difference between the client's feature mean and the pooled mean
(a per-feature effect size, as in Cohen's d, averaged in quadrature). 0 means the
client looks like the federation on average; 0.2 is a small shift per feature, 0.5 a
medium one. Quantity skew is summarised by the Gini coefficient of client sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmodel.data import TabularData


def heterogeneity(clients: Sequence[TabularData]) -> dict[str, Any]:
    """Per-client statistics and federation-level summaries (JSON-ready)."""
    sizes = np.array([len(c) for c in clients], dtype=float)
    total = sizes.sum()
    sums = sum(c.features.astype(np.float64).sum(axis=0) for c in clients)
    squares = sum(np.square(c.features.astype(np.float64)).sum(axis=0) for c in clients)
    mean = sums / total
    std = np.sqrt(np.maximum(squares / total - mean**2, 0.0))
    std = np.where(std > 1e-12, std, 1.0)
    binary = all(np.isin(c.labels, (0.0, 1.0)).all() for c in clients)
    rows = []
    for index, client in enumerate(clients):
        shift = (client.features.mean(axis=0) - mean) / std
        rows.append(
            {
                "client": str(index),
                "rows": len(client),
                # binary: share of positives; multiclass: share of the client's commonest class
                "label_rate": float(
                    client.labels.mean()
                    if binary
                    else np.bincount(client.labels.astype(int)).max() / len(client)
                ),
                "classes": len(np.unique(client.labels)),
                "drift": float(np.sqrt(np.mean(np.square(shift)))),
            }
        )
    rates = np.array([row["label_rate"] for row in rows])
    return {
        "clients": rows,
        "label_rate_is": "share of positives" if binary else "share of the commonest class",
        "size_gini": _gini(sizes),
        "size_max_over_median": float(sizes.max() / np.median(sizes)),
        "label_rate_sd": float(rates.std()),
        "mean_drift": float(np.mean([row["drift"] for row in rows])),
    }


def write_heterogeneity_plot(run_dir: Path, statistics: dict[str, Any]) -> str:
    """heterogeneity.png: client size against label rate, coloured by drift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = statistics["clients"]
    figure, axis = plt.subplots(figsize=(6, 4))
    points = axis.scatter(
        [row["rows"] for row in rows],
        [row["label_rate"] for row in rows],
        c=[row["drift"] for row in rows],
        cmap="viridis",
        s=18,
    )
    figure.colorbar(points, label="covariate drift (RMS effect size)")
    axis.set(
        xscale="log",
        xlabel="training rows (log scale)",
        ylabel=f"label rate ({statistics['label_rate_is']})",
        title=f"{len(rows)} clients: size Gini {statistics['size_gini']:.2f}, "
        f"label-rate sd {statistics['label_rate_sd']:.3f}",
    )
    axis.grid(alpha=0.3)
    figure.tight_layout()
    name = "heterogeneity.png"
    figure.savefig(run_dir / name, dpi=100)
    plt.close(figure)
    return name


def _gini(values: np.ndarray) -> float:
    """0 when every client holds the same number of rows; towards 1 when one holds all."""
    ordered = np.sort(values)
    n = len(ordered)
    if n == 0 or ordered.sum() == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float((2 * np.sum(ranks * ordered) / (n * ordered.sum())) - (n + 1) / n)
