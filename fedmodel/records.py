"""Checks on a client's training reply before it may reach aggregation.

A reply is aggregated only if it carries exactly the global model's arrays (same names,
shapes and dtypes), every value is finite, and its update (reply minus global model) is
within an optional L2-norm bound. Its metrics are the reply schema's to check
(server/reply_schema.py). Flower aborts the
whole ServerApp on inconsistent replies; rejecting them here turns a buggy or hostile
client into a logged dropout instead.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedmodel.protocol import ARRAYS_KEY, METRICS_KEY


def reply_rejection(
    content: RecordDict, reference: ArrayRecord, max_update_norm: float | None = None
) -> str | None:
    """Why `content` must not be aggregated against global model `reference`; None if fine."""
    if set(content.array_records) != {ARRAYS_KEY} or set(content.metric_records) != {METRICS_KEY}:
        return (
            f"expected one ArrayRecord '{ARRAYS_KEY}' and one MetricRecord '{METRICS_KEY}', got "
            f"{sorted(content.array_records)} and {sorted(content.metric_records)}"
        )
    arrays = content.array_records[ARRAYS_KEY]
    missing, unexpected = set(reference) - set(arrays), set(arrays) - set(reference)
    if missing or unexpected:
        return (
            "array names differ from the global model: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    squared_norm = 0.0
    for name, expected in reference.items():
        received = arrays[name]
        if list(received.shape) != list(expected.shape) or received.dtype != expected.dtype:
            return (
                f"array '{name}' is {received.dtype}{list(received.shape)}, "
                f"expected {expected.dtype}{list(expected.shape)}"
            )
        values = received.numpy()
        if not np.all(np.isfinite(values)):
            return f"array '{name}' contains NaN or infinite values"
        squared_norm += float(np.sum((values.astype(np.float64) - expected.numpy()) ** 2))
    if max_update_norm is not None and math.sqrt(squared_norm) > max_update_norm:
        return (
            f"update L2 norm {math.sqrt(squared_norm):.4g} exceeds the bound {max_update_norm:.4g}"
        )
    return None
