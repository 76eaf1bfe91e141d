"""What the SecAgg+ coordinator and clients agree on: quantization and the metrics' form.

Flower's SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead") sums integers, so each client scales its weights by its example count over
`max_weight`, clips them to [-CLIPPING_RANGE, CLIPPING_RANGE], rounds them stochastically
to QUANTIZATION_RANGE levels and masks them modulo MODULUS_RANGE. The coordinator can only
unmask the sum; `quantization_error_bound` says how far that sum's mean can be from exact
FedAvg. Legacy replies carry scalar metrics only, so lists (the privacy history) travel
as JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

CLIPPING_RANGE = 8.0  # Flower's default; model weights must stay within it
QUANTIZATION_RANGE = 2**22  # Flower's default
MODULUS_RANGE = 2**32  # Flower's default (and its maximum)
FLOAT32_RELATIVE_ERROR = 2.0**-24  # the global model is stored as float32


def legacy_metrics(metrics: Mapping[str, Any]) -> dict[str, bool | bytes | float | int | str]:
    """Client metrics in the scalar-only form a legacy FitRes accepts."""
    return {
        key: json.dumps(value) if isinstance(value, list) else value
        for key, value in metrics.items()
    }


def metrics_from_legacy(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `legacy_metrics`."""
    return {
        key: json.loads(value) if isinstance(value, str) and value.startswith("[") else value
        for key, value in metrics.items()
    }


def quantization_error_bound(
    num_examples: Sequence[int], max_weight: float, largest_weight: float
) -> float:
    """Largest per-coordinate |SecAgg+ mean - exact example-weighted mean| of the models.

    Client i sends d_i * x_i with d_i = round(n_i / max_weight * T) / T (T the quantization
    range), rounded stochastically to a grid of step 2c/T (c the clipping range), so the
    unmasked sum is sum(d_i x_i) off by less than k * 2c/T for k clients; dividing by
    D = sum(d_i) gives the mean. Rounding the weights (|d_i - n_i/max_weight| <= 1/(2T))
    moves a mean of values bounded by X = `largest_weight` by at most k * X / (T * D).
    Storing the result as float32 adds X * 2**-24. Valid while every |x_i| <= c (nothing
    clipped) and every n_i <= max_weight.
    """
    k = len(num_examples)
    total = sum(round(n / max_weight * QUANTIZATION_RANGE) for n in num_examples)
    quantized_weight_sum = total / QUANTIZATION_RANGE
    grid = k * (2 * CLIPPING_RANGE + largest_weight) / QUANTIZATION_RANGE
    return grid / quantized_weight_sum + largest_weight * FLOAT32_RELATIVE_ERROR
