"""Lesion detection in grey scans: a GroupNorm CNN, federated across hospitals' scanners.

What the user wrote, and why:

- **Data, generated, so nothing downloads.** Each 32x32 scan is smooth tissue texture plus
  sensor noise; a positive scan also holds a lesion, a small bright blob anywhere in it.
  Every site (hospital) has its own scanner, drawn from the run's seed and the site:
  brightness, contrast, blur and noise differ, the covariate shift of real multi-site
  imaging. The server's test set comes from eight scanners no client has.
- **GroupNorm, not BatchNorm.** BatchNorm normalises with statistics of the whole batch,
  so one scan's gradient depends on the others and DP-SGD cannot clip it (Opacus refuses
  the layer). GroupNorm normalises each scan on its own.
- **Max pooling over the whole map** before the last layer: a lesion counts wherever it is.
- **One loss per scan** (`reduction="none"`): DP-SGD clips each scan's gradient.

Run: PYTHONPATH=examples/lesion_imaging fedmodel simulate task lesion_task:task --lr 0.1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from fedmodel import Site, Task

SIDE = 32  # pixels
SCANS_PER_SITE = 1000
TEST_SCANNERS, SCANS_PER_TEST_SCANNER = 8, 50
LESION_RATE = 0.4
SITE_STREAM, TEST_STREAM = 0, 1  # sites and the test set draw from separate streams


@dataclass(frozen=True)
class Scanner:
    """How one site's scanner distorts what it images."""

    brightness: float
    contrast: float
    blur: float  # Gaussian sigma, pixels
    noise: float  # sensor noise, standard deviation

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Scanner:
        return cls(
            rng.uniform(-0.3, 0.3),
            rng.uniform(0.7, 1.3),
            rng.uniform(0.0, 1.0),
            rng.uniform(0.05, 0.15),
        )


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """`images` (N, 1, H, W) convolved with a Gaussian of `sigma` pixels."""
    if sigma < 0.1:
        return images
    radius = int(3 * sigma) + 1
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets.square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius,) * 4, mode="reflect")
    return F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))


def white_noise(rng: np.random.Generator, count: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((count, 1, SIDE, SIDE), np.float32))


def scans(rng: np.random.Generator, count: int, scanner: Scanner) -> TensorDataset:
    """`count` scans from `scanner`, about LESION_RATE of them with a lesion (label 1)."""
    labels = (rng.random(count) < LESION_RATE).astype(np.float32)
    rows, columns = np.mgrid[0:SIDE, 0:SIDE]
    centre_row, centre_column = rng.uniform(6, SIDE - 6, size=(2, count, 1, 1))
    radius = rng.uniform(1.5, 3.0, size=(count, 1, 1))
    peak = rng.uniform(0.8, 1.5, size=(count, 1, 1)) * labels[:, None, None]
    distance = (rows - centre_row) ** 2 + (columns - centre_column) ** 2
    lesions = torch.from_numpy((peak * np.exp(-distance / (2 * radius**2)))[:, None])
    tissue = blur(white_noise(rng, count), 3.0)
    tissue = 0.2 * tissue / tissue.std(dim=(1, 2, 3), keepdim=True)
    images = blur(tissue + lesions.float(), scanner.blur) + scanner.noise * white_noise(rng, count)
    return TensorDataset(scanner.contrast * images + scanner.brightness, torch.from_numpy(labels))


def site_scans(site: Site) -> Dataset:
    """One hospital's scans, all from its own scanner."""
    rng = np.random.default_rng([site.seed, SITE_STREAM, site.partition_id])
    return scans(rng, SCANS_PER_SITE, Scanner.draw(rng))


def test_scans(seed: int) -> Dataset:
    """Scans from TEST_SCANNERS scanners that no site has."""
    rng = np.random.default_rng([seed, TEST_STREAM])
    return ConcatDataset(
        [scans(rng, SCANS_PER_TEST_SCANNER, Scanner.draw(rng)) for _ in range(TEST_SCANNERS)]
    )


def conv_block(channels_in: int, channels_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(channels_in, channels_out, 3, padding=1),
        nn.GroupNorm(8, channels_out),
        nn.ReLU(),
    ]


def lesion_cnn() -> nn.Module:
    """Five 3x3 convolutions (135k parameters), global max pooling, one logit."""
    return nn.Sequential(
        *conv_block(1, 16), nn.MaxPool2d(2),
        *conv_block(16, 32), nn.MaxPool2d(2),
        *conv_block(32, 64), *conv_block(64, 64), nn.MaxPool2d(2),
        *conv_block(64, 128), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, 1),
    )  # fmt: skip


def per_scan_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(outputs[:, 0], labels, reduction="none")


task = Task(
    name="lesion-imaging",
    model=lesion_cnn,
    loss=per_scan_loss,
    train_data=site_scans,
    test_data=test_scans,
    metrics="binary",
    version="1",
)
