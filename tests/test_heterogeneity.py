"""Heterogeneity statistics: IID splits look IID, natural and generated sites do not."""

from __future__ import annotations

import numpy as np
import pytest

from fedmodel.config import RunConfig
from fedmodel.data import TabularData
from fedmodel.datasets.scenarios import client_partitions
from simulations.heterogeneity import heterogeneity


def test_iid_split_has_equal_sizes_and_little_drift() -> None:
    stats = heterogeneity(client_partitions(RunConfig(dataset="flchain", clients=5)))
    assert stats["size_gini"] < 0.01
    assert stats["mean_drift"] < 0.05 and stats["label_rate_sd"] < 0.02


def test_synthetic_hospitals_are_skewed_and_shifted() -> None:
    stats = heterogeneity(client_partitions(RunConfig(dataset="synthetic-ehr", clients=100)))
    assert stats["size_gini"] > 0.35 and stats["size_max_over_median"] > 5
    assert stats["mean_drift"] > 0.25  # case-mix shift of sd 0.35 per covariate


def test_drift_and_gini_match_hand_computation() -> None:
    a = TabularData(np.array([[0.0], [2.0]], dtype=np.float32), np.array([0.0, 1.0]), ("x",))
    b = TabularData(np.array([[4.0], [4.0]], dtype=np.float32), np.array([1.0, 1.0]), ("x",))
    stats = heterogeneity([a, b])
    pooled_mean, pooled_std = 2.5, np.std([0.0, 2.0, 4.0, 4.0])
    assert stats["clients"][0]["drift"] == pytest.approx(abs(1.0 - pooled_mean) / pooled_std)
    assert stats["clients"][1]["label_rate"] == 1.0 and stats["size_gini"] == 0.0
    assert stats["label_rate_is"] == "share of positives"
