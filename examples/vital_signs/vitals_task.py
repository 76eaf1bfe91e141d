"""Early warning from vital signs: an LSTM reads 24 hours of monitoring, per ward.

What the user wrote, and why:

- **Data, generated, so nothing downloads.** Each patient has 24 hourly readings of
  heart rate, systolic blood pressure, SpO2 and temperature around their own baseline.
  A deteriorating patient (label 1) drifts from some hour on: heart rate and temperature
  rise, blood pressure and SpO2 fall, each at its own pace. It is the trend that marks
  them, not the level: baselines vary more between patients than a day's drift.
- **Sites differ** (drawn from the run's seed and the site): monitors are calibrated
  differently (offsets), are noisier or quieter, and wards see more or fewer
  deteriorations. The server's test set comes from six wards no client has.
- **`opacus.layers.DPLSTM`, not `nn.LSTM`.** Opacus computes per-sample gradients of
  DPLSTM (an LSTM built from layers it can hook); `nn.LSTM`'s fused kernel hides them, so
  DP-SGD could not clip each patient's gradient. DPLSTM returns (outputs, state), so a
  small module reads the last hour's output out as one logit per patient.
- **One loss per patient** (`reduction="none"`): DP-SGD clips each patient's gradient.

Run: PYTHONPATH=examples/vital_signs fedmodel simulate task vitals_task:task
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from opacus.layers import DPLSTM
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from fedmodel import Site, Task

HOURS = 24
SIGNALS = ("heart_rate", "systolic_bp", "spo2", "temperature")
TYPICAL = np.array([78.0, 125.0, 97.0, 36.9])  # a patient's baseline: mean ...
BETWEEN_PATIENTS = np.array([10.0, 15.0, 1.2, 0.3])  # ... and spread across patients
HOURLY_NOISE = np.array([4.0, 6.0, 0.8, 0.15])
DRIFT_PER_HOUR = np.array([0.8, -0.8, -0.12, 0.025])  # a deterioration, at full pace
PATIENTS_PER_SITE = 300
TEST_WARDS, PATIENTS_PER_TEST_WARD = 6, 100
SITE_STREAM, TEST_STREAM = 0, 1  # sites and the test set draw from separate streams


def ward(rng: np.random.Generator, count: int) -> TensorDataset:
    """`count` patients of one ward, with its own monitors and deterioration rate."""
    calibration = rng.normal(0.0, 0.3, size=4) * BETWEEN_PATIENTS
    noise = rng.uniform(0.7, 1.5) * HOURLY_NOISE
    labels = (rng.random(count) < rng.uniform(0.15, 0.4)).astype(np.float32)
    baseline = TYPICAL + BETWEEN_PATIENTS * rng.standard_normal((count, 1, 4))
    onset = rng.integers(4, HOURS - 6, size=(count, 1, 1))
    pace = rng.uniform(0.2, 1.0, size=(count, 1, 4)) * labels[:, None, None]
    hours_since = np.clip(np.arange(HOURS)[None, :, None] - onset, 0, None)
    drift = pace * DRIFT_PER_HOUR * hours_since
    readings = baseline + calibration + drift + noise * rng.standard_normal((count, HOURS, 4))
    series = (readings - TYPICAL) / BETWEEN_PATIENTS  # fixed clinical scales, no data used
    return TensorDataset(torch.tensor(series, dtype=torch.float32), torch.from_numpy(labels))


def site_ward(site: Site) -> Dataset:
    return ward(
        np.random.default_rng([site.seed, SITE_STREAM, site.partition_id]), PATIENTS_PER_SITE
    )


def test_wards(seed: int) -> Dataset:
    rng = np.random.default_rng([seed, TEST_STREAM])
    return ConcatDataset([ward(rng, PATIENTS_PER_TEST_WARD) for _ in range(TEST_WARDS)])


class VitalsLSTM(nn.Module):
    """A DPLSTM over the hours and a linear read-out of the last hour: one logit."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = DPLSTM(len(SIGNALS), hidden, batch_first=True)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.lstm(series)
        return self.readout(outputs[:, -1])


def per_patient_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(outputs[:, 0], labels, reduction="none")


task = Task(
    name="vital-signs",
    model=VitalsLSTM,
    loss=per_patient_loss,
    train_data=site_ward,
    test_data=test_wards,
    metrics="binary",
    version="1",
)
