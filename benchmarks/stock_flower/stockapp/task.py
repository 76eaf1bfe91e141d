"""Model and data of the stock baseline: the same MLP shape and data sizes as FedModel's."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """features -> 32 -> 16 -> 1, FedModel's tabular MLP."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(num_features, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def load_data(seed: int, num_features: int, rows: int, batch_size: int) -> DataLoader:
    """Synthetic binary rows of one client, generated from its seed (as in Flower's examples)."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(rows, num_features)).astype(np.float32)
    logits = features @ rng.normal(size=num_features) * 0.5 - 2.0
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    dataset = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True)
