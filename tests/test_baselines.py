"""Baselines beside every federation: central, central under DP, each site alone."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch.utils.data import ConcatDataset, Dataset

from fedmodel.config import RunConfig
from fedmodel.datasets.scenarios import federation
from fedmodel.task import Task, client_datasets
from fedmodel.task_loading import load_task
from simulations.baselines import constant_prediction, run_baselines


def _task_data(config: RunConfig) -> tuple[Task, Sequence[Dataset], Dataset]:
    """The run's task, its clients' rows and its test set, as the CLI passes them."""
    task = load_task(config)
    return task, client_datasets(task, config.clients, config.seed), task.test_data(config.seed)


def test_baselines_on_breast_cancer_are_consistent_and_honest() -> None:
    config = RunConfig(dataset="breast-cancer", clients=4, rounds=2, epsilon=1.0, lr=0.1)
    clients = federation(config)
    federated = {"auroc": 0.97}
    baselines = run_baselines(config, *_task_data(config), federated, max_sites=2)

    pooled_features = np.concatenate([c.features for c in clients.clients])
    pooled_labels = np.concatenate([c.labels for c in clients.clients])
    reference = LogisticRegression(max_iter=1000).fit(pooled_features, pooled_labels)
    sklearn_auroc = roc_auc_score(
        clients.test.labels, reference.predict_proba(clients.test.features)[:, 1]
    )
    central, central_dp = baselines["central"], baselines["central_dp"]
    assert central["rows"] == len(pooled_labels) == 456
    assert central["auroc"] > sklearn_auroc - 0.03  # the same task, an independent fit
    assert 0.9 < central_dp["epsilon"] <= 1.0  # calibrated to the run's budget, not over
    assert central_dp["auroc"] <= central["auroc"] + 0.01

    local = baselines["local"]
    assert len(local) == baselines["local_sites"] == 2 and baselines["local_sites_total"] == 4
    assert all(0.9 < row["epsilon"] <= 1.0 for row in local)
    assert baselines["local_worst"]["auroc"] == min(row["auroc"] for row in local)
    assert baselines["local_mean"]["auroc"] == pytest.approx(np.mean([r["auroc"] for r in local]))
    comparison = baselines["comparison"]
    assert comparison["metric"] == "auroc"
    assert comparison["federated_minus_local_worst"] == pytest.approx(
        0.97 - baselines["local_worst"]["auroc"]
    )
    assert comparison["central_minus_central_dp"] == pytest.approx(
        central["auroc"] - central_dp["auroc"]
    )

    # No model: every test row given the pooled training rows' base rate, scored by hand.
    base_rate = pooled_labels.mean()
    test_labels = clients.test.labels
    log_loss = -np.mean(test_labels * np.log(base_rate) + (1 - test_labels) * np.log(1 - base_rate))
    constant = baselines["constant"]
    assert constant["loss"] == pytest.approx(log_loss, rel=1e-4)
    assert constant["auroc"] == 0.5
    assert constant["accuracy"] == pytest.approx(max(test_labels.mean(), 1 - test_labels.mean()))


def test_without_dp_there_is_no_central_dp_baseline() -> None:
    config = RunConfig(dataset="breast-cancer", clients=2, rounds=1, dp="off")
    baselines = run_baselines(config, *_task_data(config), {"auroc": 0.9}, 1)
    assert baselines["central_dp"] is None
    assert "epsilon" not in baselines["local"][0]
    assert baselines["comparison"]["central_minus_central_dp"] is None


def test_the_constant_prediction_of_ten_classes_is_their_training_shares() -> None:
    """Cross-entropy of the class shares, computed by hand: the constant's loss is the
    entropy of the test labels measured against the training shares."""
    config = RunConfig(scenario="digits", dataset="mnist-5k", clients=2, partition="shard")
    task, clients, test = _task_data(config)
    train_labels = np.concatenate([c.tensors[1].numpy() for c in clients]).astype(int)  # type: ignore[attr-defined]
    test_labels = test.tensors[1].numpy().astype(int)  # type: ignore[attr-defined]
    shares = np.bincount(train_labels, minlength=10) / len(train_labels)
    constant = constant_prediction(task, ConcatDataset(clients), test)
    assert constant["loss"] == pytest.approx(-np.mean(np.log(shares[test_labels])), rel=1e-4)
    assert constant["accuracy"] == pytest.approx(np.mean(test_labels == shares.argmax()))
