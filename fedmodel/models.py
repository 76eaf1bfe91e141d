"""Model registry: one name per architecture, each compatible with Opacus DP-SGD.

Every model maps a float feature tensor to one logit per row (binary tasks) or one per
class (multiclass tasks, e.g. 10 digits) and uses only layers Opacus has per-sample gradient
samplers for (Linear, Conv2d, ReLU, pooling; no BatchNorm). ClassifierLoss is the loss that
goes with those outputs, in training and evaluation alike.
"""

from collections.abc import Callable

import torch
from torch import nn

from fedmodel.errors import ConfigError


def tabular_mlp(num_features: int, num_outputs: int) -> nn.Module:
    """Two hidden layers: enough for tabular risk scores, small enough for DP noise."""
    return nn.Sequential(
        nn.Linear(num_features, 32),
        nn.ReLU(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, num_outputs),
    )


def logistic_regression(num_features: int, num_outputs: int) -> nn.Module:
    """The classical clinical baseline: a single linear layer on standardised features
    (multinomial logistic regression with more than one output)."""
    return nn.Sequential(nn.Linear(num_features, num_outputs))


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


IMAGE_SIDE = 28


def small_cnn(num_features: int, num_outputs: int) -> nn.Module:
    """Conv 32-64-64 + Dense 64 over 28x28 grey images (flattened rows).

    The classic small MNIST network (the TensorFlow CNN tutorial's layout); no BatchNorm,
    so Opacus can compute per-sample gradients.
    """
    if num_features != IMAGE_SIDE * IMAGE_SIDE:
        raise ConfigError(
            f"model 'cnn' needs 28x28 images ({IMAGE_SIDE * IMAGE_SIDE} features), "
            f"got {num_features} features; use mlp or logreg for tables"
        )
    return nn.Sequential(
        nn.Unflatten(1, (1, IMAGE_SIDE, IMAGE_SIDE)),
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 3 * 3, 64),
        nn.ReLU(),
        nn.Linear(64, num_outputs),
    )


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "mlp": tabular_mlp,
    "logreg": logistic_regression,
    "cnn": small_cnn,
}


def build_model(name: str, num_features: int, num_classes: int = 2) -> nn.Module:
    """Instantiate a registered model for `num_features` inputs and `num_classes` classes
    (one logit for two classes, one per class for more)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model '{name}'; choose one of: {', '.join(sorted(MODELS))}"
        ) from None
    return factory(num_features, 1 if num_classes == 2 else num_classes)
