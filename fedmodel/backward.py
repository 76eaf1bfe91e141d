"""One batch's forward and backward pass, for plain SGD and for each DP-SGD mode.

Each pass leaves what the optimizer's step needs and returns the batch's finite loss,
so that a sample whose loss or gradient is not finite (a crafted global model) adds
exactly zero instead of turning the update or the reported loss into NaN. An empty
Poisson batch still gets a (zero) gradient: DP-SGD noises and accounts every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fedmodel.task import PerSampleLoss

BatchBackward = Callable[[torch.Tensor, torch.Tensor], tuple[float, int]]
"""Forward and backward passes on one batch, leaving what the optimizer's step needs;
returns the sum and the count of the batch's finite per-sample losses."""


class ReducibleLoss(nn.Module):
    """A per-sample loss with torch's `reduction` attribute ("mean", "sum" or "none"):
    Opacus's ghost clipping sets it to "none" to get each sample's loss."""

    def __init__(self, per_sample_loss: PerSampleLoss, reduction: str = "mean") -> None:
        super().__init__()
        self.per_sample_loss, self.reduction = per_sample_loss, reduction

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = self.per_sample_loss(outputs, targets)
        if self.reduction == "mean":
            return losses.mean()
        return losses.sum() if self.reduction == "sum" else losses


def mean_loss_backward(model: nn.Module, per_sample_loss: PerSampleLoss) -> BatchBackward:
    """Autograd on the batch-mean loss: plain SGD, and the fused step (whose hooks read
    each layer's input and output gradient; no batch leaves it a zero clipped sum)."""

    def backward(features: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        if len(labels) == 0:
            return 0.0, 0
        losses = per_sample_loss(model(features), labels)
        losses.mean().backward()
        return _finite_total(losses.detach())

    return backward


def per_sample_backward(model: nn.Module, per_sample_loss: PerSampleLoss) -> BatchBackward:
    """Opacus's hooks, functorch and ew modes: p.grad_sample holds one row per sample.

    An empty batch gets zero-row per-sample gradients, which Opacus's optimizer clips
    to a zero sum before adding noise (ew cannot run a forward pass on no rows).
    """
    plain_backward = mean_loss_backward(model, per_sample_loss)
    parameters = [p for p in model.parameters() if p.requires_grad]

    def backward(features: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        if len(labels) == 0:
            for parameter in parameters:
                parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))  # type: ignore[attr-defined]
            return 0.0, 0
        total = plain_backward(features, labels)
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


def ghost_backward(model: Any, optimizer: Any, criterion: Any) -> BatchBackward:
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
