"""Local training (plain or DP-SGD with Opacus) and evaluation of classifiers.

A model with one output is a binary classifier (logit, BCE loss); a model with k > 1
outputs is a k-class classifier (logits, cross-entropy) and its ranking metrics are
macro-averaged one-vs-rest.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedmodel.data import TabularData
from fedmodel.errors import ConfigError
from fedmodel.privacy.accountant import ACCOUNTANT, Segment, merge_segments


@dataclass(frozen=True)
class TrainResult:
    """What one local training job produced, besides the updated model weights."""

    loss: float
    history: list[Segment] = field(default_factory=list)


def select_device(preference: str = "auto") -> torch.device:
    """`auto` picks the first CUDA device when there is one, else the CPU.

    Raises ConfigError when `cuda[:N]` is asked for and that device does not exist here.
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            found = f"only {count} CUDA device(s)" if count else "no CUDA device"
            raise ConfigError(
                f"--device {preference}: this machine has {found}; use --device auto or cpu"
            )
    return device


def train_plain(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    lr: float,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Non-private SGD: the baseline DP-SGD is measured against.

    `proximal_mu` > 0 adds FedProx's proximal term (see `_ProximalTerm`).
    """
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    proximal = _ProximalTerm(model, proximal_mu, lr)
    return TrainResult(loss=_run_epochs(model, optimizer, loader, epochs, device, proximal))


def train_dp(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    history: Sequence[Segment],
    device: torch.device,
    proximal_mu: float = 0.0,
    grad_sample_mode: str = "hooks",
) -> TrainResult:
    """DP-SGD (Abadi et al. 2016) through Opacus, continuing the accountant's `history`.

    The accountant is restored from `history` before training, so the returned history
    (and any epsilon computed from it) composes across rounds; a fresh accountant per
    round would silently under-report. `model` is trained in place and keeps its plain
    parameter names (Opacus's wrapper is removed afterwards). `proximal_mu` > 0 adds
    FedProx's proximal term outside the clipping and noise (see `_ProximalTerm`).
    `grad_sample_mode` only changes how Opacus computes per-sample gradient norms
    (fedmodel.dp_modes picks the fastest per model), never the clipping, the noise or
    the accounting.
    """
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    proximal = _ProximalTerm(model, proximal_mu, lr)
    engine = privacy_engine(history)
    private = make_private(
        engine, model, optimizer, loader, noise_multiplier, max_grad_norm, grad_sample_mode
    )
    try:
        with warnings.catch_warnings():
            # Opacus's hooks fire on the first layer, whose input needs no gradient: harmless.
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            loss = _run_epochs(
                private.model,
                private.optimizer,
                private.loader,
                epochs,
                device,
                proximal,
                private.criterion,
            )
    finally:
        private.close()
    return TrainResult(loss=loss, history=merge_segments(engine.accountant.history))


def privacy_engine(history: Sequence[Segment] = ()) -> Any:
    """An Opacus PrivacyEngine whose accountant continues from `history`."""
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Opacus's secure_mode needs torchcsprng, which does not exist for torch 2.x.
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant=ACCOUNTANT)
    if history:
        engine.accountant.load_state_dict({"history": list(history), "mechanism": ACCOUNTANT})
    return engine


@dataclass(frozen=True)
class PrivateTraining:
    """What Opacus's make_private hands back, in the same shape for every grad-sample mode."""

    model: Any  # an Opacus GradSampleModule wrapping the caller's model, or the model
    optimizer: Any  # a DPOptimizer, or fedmodel.fused_dp.FusedLinearDPSGD
    criterion: Callable[[torch.Tensor, torch.Tensor], Any]
    loader: DataLoader
    close: Callable[[], None]  # removes the hooks: the model keeps its plain parameter names


def make_private(
    engine: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str,
    poisson_sampling: bool = True,
) -> PrivateTraining:
    """Opacus's `engine.make_private` for any grad-sample mode (hooks, ghost, functorch, ew),
    or our fused DP-SGD step for Linear-only models (`fused`, fedmodel/fused_dp.py) on
    Opacus's Poisson loader and accountant.

    Ghost clipping (Li et al. 2022, "Large Language Models Can Be Strong Differentially
    Private Learners") clips without materialising per-sample gradients: its criterion
    runs two backward passes inside `loss.backward()`, so in that mode Opacus also
    returns a wrapped criterion, which the training loop must use.
    """
    if grad_sample_mode == "fused":
        from fedmodel.fused_dp import FusedLinearDPSGD, poisson_loader

        (group,) = optimizer.param_groups
        if type(optimizer) is not torch.optim.SGD or group["momentum"] or group["weight_decay"]:
            raise ValueError("grad-sample mode 'fused' implements plain SGD only")
        private_loader = poisson_loader(loader) if poisson_sampling else loader
        sample_rate = 1 / len(private_loader)  # as Opacus: expected batch = rows * rate
        fused = FusedLinearDPSGD(
            model, group["lr"], noise_multiplier, max_grad_norm,
            int(len(private_loader.dataset) * sample_rate),  # type: ignore[arg-type]
            engine.accountant, sample_rate,
        )  # fmt: skip
        return PrivateTraining(model, fused, ClassifierLoss(), private_loader, fused.close)
    made = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=ClassifierLoss(),
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
        grad_sample_mode=grad_sample_mode,
    )
    if grad_sample_mode == "ghost":
        private_model, private_optimizer, criterion, private_loader = made
    else:
        (private_model, private_optimizer, private_loader), criterion = made, ClassifierLoss()
    return PrivateTraining(
        private_model, private_optimizer, criterion, private_loader, private_model._close
    )


class _ProximalTerm:
    """FedProx's proximal term mu/2 * ||w - w_global||^2 (Li et al. 2020, "Federated
    Optimization in Heterogeneous Networks"), as a decoupled gradient step.

    Each SGD step also moves every weight by -lr * mu * (w - w_global), with w taken
    before the step: for plain SGD that is exactly SGD on loss + mu/2 * ||w - w_global||^2.
    Under DP-SGD it must be done this way: Opacus rebuilds each gradient from per-sample
    gradients (clipped, noised), so a term added to the loss would be silently dropped.
    The term does not touch the data, so applying it unclipped and noiseless costs no
    privacy (post-processing).
    """

    def __init__(self, model: nn.Module, mu: float, lr: float) -> None:
        self.scale = lr * mu
        self.parameters = [p for p in model.parameters() if p.requires_grad] if mu > 0 else []
        self.anchor = [p.detach().clone() for p in self.parameters]

    def pull(self) -> list[torch.Tensor]:
        """The step's proximal displacement, read before the optimiser moves the weights."""
        if not self.anchor:
            return []
        with torch.no_grad():
            return [self.scale * (p - a) for p, a in zip(self.parameters, self.anchor, strict=True)]

    @torch.no_grad()
    def apply(self, displacement: list[torch.Tensor]) -> None:
        for parameter, step in zip(self.parameters, displacement, strict=True):
            parameter.sub_(step)


def _run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    epochs: int,
    device: torch.device,
    proximal: _ProximalTerm,
    criterion: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
) -> float:
    criterion = criterion or ClassifierLoss()
    model.train()
    total_loss, total_rows = 0.0, 0
    for _ in range(epochs):
        for features, labels in loader:
            if len(labels) == 0:  # Poisson sampling can draw an empty batch
                continue
            features, labels = features.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(features), labels)
            loss.backward()
            displacement = proximal.pull()
            optimizer.step()
            proximal.apply(displacement)
            total_loss += loss.item() * len(labels)
            total_rows += len(labels)
    return total_loss / max(total_rows, 1)


class ClassifierLoss(nn.Module):
    """BCE on one logit per row, cross-entropy on k > 1 logits (labels are class indices).

    A module with torch's `reduction` attribute because ghost clipping re-runs the
    criterion with reduction "none" to get each sample's loss.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] == 1:
            return nn.functional.binary_cross_entropy_with_logits(
                logits.squeeze(-1), labels, reduction=self.reduction
            )
        return nn.functional.cross_entropy(logits, labels.long(), reduction=self.reduction)


@torch.no_grad()
def evaluate(model: nn.Module, data: TabularData) -> dict[str, float]:
    """Loss, accuracy, AUROC, AUPRC and recall at 1% false-positive rate on `data`.

    AUPRC and recall at a fixed low FPR are what imbalanced tasks (fraud, rare events)
    are judged by: AUROC stays high when a model ranks a few positives well but floods
    the reviewers with false alarms (Saito and Rehmsmeier 2015). Multiclass models get
    macro one-vs-rest versions of the three ranking metrics.
    """
    model.eval()
    features, labels = data.tensors()
    logits = model(features)
    loss = float(ClassifierLoss()(logits, labels))
    if logits.shape[-1] == 1:
        scores = logits.squeeze(-1).numpy()
        accuracy = float(np.mean((scores > 0) == (data.labels > 0.5)))
        ranking = _ranking_metrics(data.labels, scores)
    else:
        probabilities = torch.softmax(logits, dim=-1).numpy()
        accuracy = float(np.mean(probabilities.argmax(axis=1) == data.labels.astype(int)))
        per_class = [
            _ranking_metrics((data.labels == k).astype(float), probabilities[:, k])
            for k in range(probabilities.shape[1])
        ]
        ranking = {name: float(np.nanmean([m[name] for m in per_class])) for name in per_class[0]}
    return {**ranking, "accuracy": accuracy, "loss": loss}


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
