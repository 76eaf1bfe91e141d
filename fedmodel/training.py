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
from fedmodel.sampling import dp_generators, poisson_loader


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
    backward = _mean_loss_backward(model)
    return TrainResult(
        loss=_run_epochs(model, optimizer, loader, epochs, device, proximal, backward)
    )


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
    *,
    seed: int | None = None,
) -> TrainResult:
    """DP-SGD (Abadi et al. 2016) through Opacus, continuing the accountant's `history`.

    The accountant is restored from `history` before training, so the returned history
    (and any epsilon computed from it) composes across rounds; a fresh accountant per
    round would silently under-report. Batches are Poisson samples of `loader`'s rows
    at exactly fedmodel.sampling.poisson_plan(rows, loader.batch_size): the history
    gains (noise_multiplier, 1/L, epochs * L). Every step adds noise and is accounted,
    an empty batch included. `model` is trained in place and keeps its plain parameter
    names (Opacus's wrapper is removed afterwards). `proximal_mu` > 0 adds FedProx's
    proximal term outside the clipping and noise (see `_ProximalTerm`).
    `grad_sample_mode` only changes how per-sample gradient norms are computed
    (fedmodel.dp_modes picks the fastest per model), never the clipping, the noise or
    the accounting. `seed` seeds the noise and the batches (fedmodel.sampling.dp_generators;
    None draws one from the OS); torch's global generator is not used.
    """
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    proximal = _ProximalTerm(model, proximal_mu, lr)
    engine = privacy_engine(history)
    private = make_private(
        engine, model, optimizer, loader, noise_multiplier, max_grad_norm, grad_sample_mode,
        seed=seed,
    )  # fmt: skip
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
                private.backward,
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


BatchBackward = Callable[[torch.Tensor, torch.Tensor], tuple[float, int]]
"""Forward and backward passes on one batch, leaving what the optimizer's step needs;
returns the sum and the count of the batch's finite per-sample losses."""


@dataclass(frozen=True)
class PrivateTraining:
    """What Opacus's make_private hands back, in the same shape for every grad-sample mode."""

    model: Any  # an Opacus GradSampleModule wrapping the caller's model, or the model
    optimizer: Any  # a DPOptimizer, or fedmodel.fused_dp.FusedLinearDPSGD
    loader: DataLoader
    close: Callable[[], None]  # removes the hooks: the model keeps its plain parameter names
    backward: BatchBackward  # this mode's backward pass: call it between zero_grad and step


def make_private(
    engine: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str,
    poisson_sampling: bool = True,
    *,
    seed: int | None = None,
) -> PrivateTraining:
    """Opacus's `engine.make_private` for any grad-sample mode (hooks, ghost, functorch, ew),
    or our fused DP-SGD step for Linear-only models (`fused`, fedmodel/fused_dp.py) on
    Opacus's accountant.

    With `poisson_sampling`, batches come from fedmodel.sampling's Poisson sampler (not
    Opacus's, whose epoch can be one batch short of the rate it records); without, from
    `loader` as it is (benchmarks: fixed batches). Either way Opacus's rule holds:
    sample rate 1 / len(loader), expected batch int(rows * rate). Noise and batches come
    from generators seeded by `seed` (fedmodel.sampling.dp_generators; None: from the OS).

    Ghost clipping (Li et al. 2022, "Large Language Models Can Be Strong Differentially
    Private Learners") clips without materialising per-sample gradients: its criterion
    runs two backward passes inside `loss.backward()`, which the mode's `backward` calls.
    """
    noise_generator, sampling_generator = dp_generators(seed, next(model.parameters()).device)
    if poisson_sampling:
        loader = poisson_loader(loader, sampling_generator)
    sample_rate = 1 / len(loader)
    if grad_sample_mode == "fused":
        from fedmodel.fused_dp import FusedLinearDPSGD

        (group,) = optimizer.param_groups
        if type(optimizer) is not torch.optim.SGD or group["momentum"] or group["weight_decay"]:
            raise ValueError("grad-sample mode 'fused' implements plain SGD only")
        fused = FusedLinearDPSGD(
            model, group["lr"], noise_multiplier, max_grad_norm,
            int(len(loader.dataset) * sample_rate),  # type: ignore[arg-type]
            engine.accountant, sample_rate, noise_generator,
        )  # fmt: skip
        return PrivateTraining(model, fused, loader, fused.close, _mean_loss_backward(model))
    made = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=ClassifierLoss(),
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,  # the loader samples already
        noise_generator=noise_generator,
        grad_sample_mode=grad_sample_mode,
    )
    if grad_sample_mode == "ghost":
        private_model, private_optimizer, criterion, _ = made
        backward = _ghost_backward(private_model, private_optimizer, criterion)
    else:
        private_model, private_optimizer, _ = made
        backward = _per_sample_backward(private_model)
    if poisson_sampling:  # as Opacus does under its own Poisson sampling
        private_model.forbid_grad_accumulation()
    return PrivateTraining(private_model, private_optimizer, loader, private_model._close, backward)


def _mean_loss_backward(model: nn.Module) -> BatchBackward:
    """Autograd on the batch-mean loss: plain SGD, and the fused step (whose hooks read
    each layer's input and output gradient; no batch leaves it a zero clipped sum)."""
    per_sample_loss = ClassifierLoss(reduction="none")

    def backward(features: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        if len(labels) == 0:
            return 0.0, 0
        losses = per_sample_loss(model(features), labels)
        losses.mean().backward()
        return _finite_total(losses.detach())

    return backward


def _per_sample_backward(model: nn.Module) -> BatchBackward:
    """Opacus's hooks, functorch and ew modes: p.grad_sample holds one row per sample.

    An empty batch gets zero-row per-sample gradients, which Opacus's optimizer clips
    to a zero sum before adding noise (ew cannot run a forward pass on no rows).
    """
    mean_loss_backward = _mean_loss_backward(model)
    parameters = [p for p in model.parameters() if p.requires_grad]

    def backward(features: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        if len(labels) == 0:
            for parameter in parameters:
                parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))  # type: ignore[attr-defined]
            return 0.0, 0
        total = mean_loss_backward(features, labels)
        _zero_nonfinite_samples(parameters)
        return total

    return backward


def _zero_nonfinite_samples(parameters: Sequence[torch.Tensor]) -> None:
    """Zero every sample's per-sample gradients whose total norm, computed as Opacus's
    clipping computes it, is not finite, so that the sample contributes exactly zero.

    Opacus's clip factor C / (norm + 1e-6), clamped at 1, is NaN for a NaN norm (the
    clamp lets NaN through) and 0 for an inf one, and 0 times an inf entry is NaN again.
    Otherwise a crafted global model could make the reply NaN exactly when one target
    record was sampled. Other samples' rows are independent of it, so they are unchanged.
    """
    samples = [parameter.grad_sample for parameter in parameters]  # type: ignore[attr-defined]
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1)
    dropped = ~torch.isfinite(norms.norm(2, dim=1))
    for sample in samples:
        sample.masked_fill_(dropped.view(-1, *(1,) * (sample.dim() - 1)), 0.0)


def _ghost_backward(model: Any, optimizer: Any, criterion: Any) -> BatchBackward:
    """Opacus's ghost clipping: per-sample norms, then a second, reweighted backward pass.

    The second pass sums over the batch inside autograd, so a sample whose norm is not
    finite cannot be given a zero weight (0 times its inf activations is NaN): the
    batch is run again without it, which is the same update as a zero contribution.
    An empty batch is a zero gradient, to which the optimizer adds noise.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]

    def backward(features: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        if len(labels) == 0:
            for parameter in parameters:
                parameter.grad = torch.zeros_like(parameter)
            return 0.0, 0
        loss = criterion(model(features), labels)
        loss.backward()
        finite = torch.isfinite(model.per_sample_gradient_norms)
        if not bool(finite.all()):
            optimizer.zero_grad()
            return backward(features[finite], labels[finite])
        return _finite_total(loss.loss_per_sample.detach())

    return backward


def _finite_total(losses: torch.Tensor) -> tuple[float, int]:
    """Sum and count of the finite per-sample losses: a reported training loss that a
    crafted model cannot turn into inf or NaN by one record's presence."""
    finite = torch.isfinite(losses)
    total, count = torch.stack(
        (torch.where(finite, losses, 0.0).sum(), finite.sum().to(losses.dtype))
    ).tolist()
    return total, int(count)


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
    backward: BatchBackward,
) -> float:
    """Every batch is a step, an empty one too: DP-SGD's noise and accounting need it."""
    model.train()
    total_loss, total_rows = 0.0, 0
    for _ in range(epochs):
        for features, labels in loader:
            optimizer.zero_grad()
            loss, rows = backward(features.to(device), labels.to(device))
            displacement = proximal.pull()
            optimizer.step()
            proximal.apply(displacement)
            total_loss += loss
            total_rows += rows
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
