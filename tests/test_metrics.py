"""Ranking metrics for imbalanced tasks, checked against sklearn's independent code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from fedmodel.data import TabularData
from fedmodel.evaluation import auprc, evaluate, recall_at_fpr
from fedmodel.models import ClassifierLoss

LOSS = ClassifierLoss(reduction="none")

CASES = [(5000, 0.003, 0), (2000, 0.05, 1), (300, 0.4, 2)]


def _imbalanced(size: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(size) < rate).astype(float)
    return labels, np.round(labels * 1.5 + rng.normal(size=size), 1)  # rounding: ties


@pytest.mark.parametrize(("size", "rate", "seed"), CASES)
def test_auprc_equals_sklearn_average_precision(size: int, rate: float, seed: int) -> None:
    labels, scores = _imbalanced(size, rate, seed)
    assert auprc(labels, scores) == pytest.approx(average_precision_score(labels, scores), 1e-12)


@pytest.mark.parametrize(("size", "rate", "seed"), CASES)
def test_recall_at_one_percent_fpr_equals_the_roc_curve(size: int, rate: float, seed: int) -> None:
    labels, scores = _imbalanced(size, rate, seed)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert recall_at_fpr(labels, scores, 0.01) == pytest.approx(tpr[fpr <= 0.01].max(), 1e-12)


def test_ranking_metrics_are_undefined_without_both_classes() -> None:
    assert np.isnan(auprc(np.zeros(5), np.arange(5.0)))
    assert np.isnan(recall_at_fpr(np.ones(5), np.arange(5.0), 0.01))


def test_multiclass_evaluation_is_macro_one_vs_rest() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    features = np.eye(3)[labels] + rng.normal(0, 1.0, (600, 3))
    data = TabularData(features.astype(np.float32), labels.astype(np.float32), ("a", "b", "c"))
    model = torch.nn.Identity()  # the features are the logits
    metrics = evaluate(model, data.dataset(), LOSS, "multiclass")
    probabilities = torch.softmax(torch.as_tensor(features, dtype=torch.float32), 1).numpy()
    assert metrics["auroc"] == pytest.approx(
        roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"), 1e-9
    )
    assert metrics["accuracy"] == pytest.approx(np.mean(features.argmax(1) == labels))
    expected_loss = torch.nn.functional.cross_entropy(
        torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(labels)
    )
    assert metrics["loss"] == pytest.approx(float(expected_loss), 1e-6)
