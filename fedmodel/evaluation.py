"""Scores of a trained model: its task's loss, and classifier, regression or user metrics."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedmodel.task import MetricFunction, MetricKind, PerSampleLoss


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """(outputs, targets) of `model` on every row of `data`, on the CPU.

    A TensorDataset is scored in one pass; other datasets in batches of `batch_size`
    on the model's device.
    """
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # a model may have none
    if isinstance(data, TensorDataset):
        inputs, targets = data.tensors
        return model(inputs.to(device)).cpu(), targets.cpu()
    output_batches: list[Tensor] = []
    target_batches: list[Tensor] = []
    for batch_inputs, batch_targets in DataLoader(data, batch_size=batch_size):
        output_batches.append(model(batch_inputs.to(device)).cpu())
        target_batches.append(batch_targets)
    return torch.cat(output_batches), torch.cat(target_batches)


def evaluate(
    model: nn.Module,
    data: Dataset,
    loss: PerSampleLoss,
    metrics: MetricKind | Mapping[str, MetricFunction] = "binary",
) -> dict[str, float]:
    """The mean per-sample `loss` on `data` and the task's metrics.

    Built-in kinds: binary and multiclass get AUROC, AUPRC, recall at 1% false-positive
    rate and accuracy (AUPRC and recall at a fixed low FPR are what imbalanced tasks
    are judged by: AUROC stays high when a model ranks a few positives well but floods
    the reviewers with false alarms; Saito and Rehmsmeier 2015); multiclass models get
    macro one-vs-rest versions of the ranking metrics. Regression gets MSE, MAE and R2.
    A mapping of user functions is called on (outputs, targets) as NumPy arrays.
    """
    outputs, targets = predict(model, data)
    mean_loss = float(loss(outputs, targets).mean())
    if not isinstance(metrics, str):
        scored = {
            name: float(function(outputs.numpy(), targets.numpy()))
            for name, function in metrics.items()
        }
        return {**scored, "loss": mean_loss}
    if metrics == "regression":
        return {
            **regression_metrics(targets.numpy(), outputs.reshape(len(outputs), -1)[:, 0].numpy()),
            "loss": mean_loss,
        }
    labels = targets.numpy()
    if metrics == "binary":
        scores = outputs.reshape(len(outputs), -1)[:, 0].numpy()
        accuracy = float(np.mean((scores > 0) == (labels > 0.5)))
        ranking = _ranking_metrics(labels, scores)
    else:
        probabilities = torch.softmax(outputs, dim=-1).numpy()
        accuracy = float(np.mean(probabilities.argmax(axis=1) == labels.astype(int)))
        per_class = [
            _ranking_metrics((labels == k).astype(float), probabilities[:, k])
            for k in range(probabilities.shape[1])
        ]
        ranking = {name: float(np.nanmean([m[name] for m in per_class])) for name in per_class[0]}
    return {**ranking, "accuracy": accuracy, "loss": mean_loss}


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Mean squared and absolute error, and R2 (1 - SSE / SST; NaN for a constant target)."""
    errors = predictions.astype(np.float64) - targets.astype(np.float64)
    total = float(np.square(targets - targets.mean()).sum())
    sse = float(np.square(errors).sum())
    return {
        "mse": float(np.mean(np.square(errors))),
        "mae": float(np.mean(np.abs(errors))),
        "r2": 1.0 - sse / total if total > 0 else float("nan"),
    }


def _ranking_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {
        "auroc": auroc(labels, scores),
        "auprc": auprc(labels, scores),
        "recall_at_1pct_fpr": recall_at_fpr(labels, scores, 0.01),
    }


def _cumulative_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives when predicting positive at or above each distinct score."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, positives = scores[order], labels[order] > 0.5
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    true_positives = np.cumsum(positives)[last_of_tie]
    return true_positives, last_of_tie + 1 - true_positives


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (step-wise, no
    interpolation), the same definition as sklearn's `average_precision_score`."""
    num_pos = int((labels > 0.5).sum())
    if num_pos == 0 or num_pos == len(labels):
        return float("nan")
    true_positives, false_positives = _cumulative_counts(labels, scores)
    precision = true_positives / (true_positives + false_positives)
    recall_gain = np.diff(np.r_[0, true_positives]) / num_pos
    return float(np.sum(recall_gain * precision))


def recall_at_fpr(labels: np.ndarray, scores: np.ndarray, max_fpr: float) -> float:
    """Largest recall of any score threshold whose false-positive rate is at most `max_fpr`."""
    num_pos = int((labels > 0.5).sum())
    num_neg = len(labels) - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    true_positives, false_positives = _cumulative_counts(labels, scores)
    allowed = false_positives <= max_fpr * num_neg
    return float(true_positives[allowed].max() / num_pos) if allowed.any() else 0.0


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count half)."""
    positives = labels > 0.5
    num_pos, num_neg = int(positives.sum()), int((~positives).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores))
    return float((ranks[positives].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (scipy's rankdata 'average', without
    importing scipy.stats: over a second of start-up for every process that scores)."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    first_of_group = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    starts = np.flatnonzero(first_of_group)
    ends = np.append(starts[1:], len(values))
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(first_of_group) - 1]
    return ranks
