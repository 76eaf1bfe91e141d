"""Local training (plain or DP-SGD with Opacus) and evaluation of binary classifiers."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn
from torch.utils.data import DataLoader

from fedmodel.data import TabularData
from fedmodel.privacy.accountant import ACCOUNTANT, Segment, merge_segments


@dataclass(frozen=True)
class TrainResult:
    """What one local training job produced, besides the updated model weights."""

    loss: float
    history: list[Segment] = field(default_factory=list)


def select_device(preference: str = "auto") -> torch.device:
    """`auto` picks the first CUDA device when there is one, else the CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def train_plain(
    model: nn.Module, loader: DataLoader, epochs: int, lr: float, device: torch.device
) -> TrainResult:
    """Non-private SGD: the baseline DP-SGD is measured against."""
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return TrainResult(loss=_run_epochs(model, optimizer, loader, epochs, device))


def train_dp(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    history: Sequence[Segment],
    device: torch.device,
) -> TrainResult:
    """DP-SGD (Abadi et al. 2016) through Opacus, continuing the accountant's `history`.

    The accountant is restored from `history` before training, so the returned history
    (and any epsilon computed from it) composes across rounds; a fresh accountant per
    round would silently under-report. `model` is trained in place and keeps its plain
    parameter names (Opacus's wrapper is removed afterwards).
    """
    from opacus import PrivacyEngine

    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with warnings.catch_warnings():
        # Opacus's secure_mode needs torchcsprng, which does not exist for torch 2.x.
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        # Opacus's hooks fire on the first layer, whose input needs no gradient: harmless.
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        if history:
            engine.accountant.load_state_dict({"history": list(history), "mechanism": ACCOUNTANT})
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
        )
        loss = _run_epochs(private_model, private_optimizer, private_loader, epochs, device)
    private_model._close()
    return TrainResult(loss=loss, history=merge_segments(engine.accountant.history))


def _run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    epochs: int,
    device: torch.device,
) -> float:
    criterion = nn.BCEWithLogitsLoss()
    model.train()
    total_loss, total_rows = 0.0, 0
    for _ in range(epochs):
        for features, labels in loader:
            if len(labels) == 0:  # Poisson sampling can draw an empty batch
                continue
            features, labels = features.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(features).squeeze(-1), labels)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            total_rows += len(labels)
    return total_loss / max(total_rows, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: TabularData) -> dict[str, float]:
    """Loss, accuracy at threshold 0.5 and AUROC of `model` on `data`."""
    model.eval()
    features, labels = data.tensors()
    logits = model(features).squeeze(-1)
    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, labels))
    scores = logits.numpy()
    accuracy = float(np.mean((scores > 0) == (data.labels > 0.5)))
    return {"auroc": auroc(data.labels, scores), "accuracy": accuracy, "loss": loss}


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count half)."""
    positives = labels > 0.5
    num_pos, num_neg = int(positives.sum()), int((~positives).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))
