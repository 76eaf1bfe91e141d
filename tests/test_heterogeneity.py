"""Heterogeneity statistics: IID splits look IID, natural and generated sites do not."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedmodel.config import RunConfig
from fedmodel.data import TabularData
from fedmodel.datasets.scenarios import client_partitions
from simulations.heterogeneity import heterogeneity


def datasets(config: RunConfig) -> list[TensorDataset]:
    """Each client's rows as its Task hands them to training."""
    clients: Sequence[TabularData] = client_partitions(config)
    return [client.dataset() for client in clients]


def test_iid_split_has_equal_sizes_and_little_drift() -> None:
    stats = heterogeneity(datasets(RunConfig(dataset="flchain", clients=5)))
    assert stats["size_gini"] < 0.01
    assert stats["mean_drift"] < 0.05 and stats["label_rate_sd"] < 0.02


def test_synthetic_hospitals_are_skewed_and_shifted() -> None:
    stats = heterogeneity(datasets(RunConfig(dataset="synthetic-ehr", clients=100)))
    assert stats["size_gini"] > 0.35 and stats["size_max_over_median"] > 5
    assert stats["mean_drift"] > 0.25  # case-mix shift of sd 0.35 per covariate


def test_drift_and_gini_match_hand_computation() -> None:
    a = TensorDataset(torch.tensor([[0.0], [2.0]]), torch.tensor([0.0, 1.0]))
    b = TensorDataset(torch.tensor([[4.0], [4.0]]), torch.tensor([1.0, 1.0]))
    stats = heterogeneity([a, b])
    pooled_mean, pooled_std = 2.5, np.std([0.0, 2.0, 4.0, 4.0])
    assert stats["clients"][0]["drift"] == pytest.approx(abs(1.0 - pooled_mean) / pooled_std)
    assert stats["clients"][1]["label_rate"] == 1.0 and stats["size_gini"] == 0.0
    assert stats["label_rate_is"] == "share of positives"


def test_a_regression_label_rate_is_each_sites_mean_target() -> None:
    """Length of stay in whole days: integers, yet a number to regress, not classes."""
    short = TensorDataset(torch.zeros(3, 2), torch.tensor([1.0, 2.0, 3.0]))
    long = TensorDataset(torch.ones(2, 2), torch.tensor([10.0, 14.0]))
    stats = heterogeneity([short, long], "regression")
    assert stats["label_rate_is"] == "mean target"
    assert [row["label_rate"] for row in stats["clients"]] == [2.0, 12.0]
    assert stats["label_rate_sd"] == pytest.approx(5.0) and stats["clients"][0]["classes"] is None
    inferred = heterogeneity([short, TensorDataset(torch.ones(2, 2), torch.tensor([0.5, -1.5]))])
    assert inferred["label_rate_is"] == "mean target"  # fractions: continuous


def test_image_inputs_are_flattened_and_class_targets_give_the_commonest_share() -> None:
    images = TensorDataset(torch.zeros(4, 1, 3, 3), torch.tensor([2, 2, 2, 0]))
    shifted = TensorDataset(torch.ones(4, 1, 3, 3), torch.tensor([1, 0, 1, 0]))
    stats = heterogeneity([images, shifted])
    assert stats["label_rate_is"] == "share of the commonest class"
    assert [row["label_rate"] for row in stats["clients"]] == [0.75, 0.5]
    assert [row["drift"] for row in stats["clients"]] == pytest.approx([1.0, 1.0])


def test_a_thousand_generated_sites_are_summarised_in_one_pass() -> None:
    """About 0.1 s on the 2-core box; the bound catches a per-row read, not noise."""
    generator = torch.Generator().manual_seed(0)
    sites = [
        TensorDataset(torch.randn(40, 12, generator=generator), torch.rand(40, generator=generator))
        for _ in range(1000)
    ]
    started = time.perf_counter()
    stats = heterogeneity(sites)
    assert time.perf_counter() - started < 5.0
    assert len(stats["clients"]) == 1000 and stats["label_rate_is"] == "mean target"
