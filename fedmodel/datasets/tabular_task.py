"""The built-in scenarios as Tasks: a registered model on a scenario's (or a user's) table.

`fedmodel simulate medical|financial|digits|csv` run the same machinery as a user's
`fedmodel simulate task MODULE:ATTR`: this module turns the scenario catalogue
(fedmodel/datasets/scenarios.py) into a `Task`, so no role has a path of its own for the
built-in data.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from fedmodel import __version__
from fedmodel.config import RunConfig
from fedmodel.data import TabularData
from fedmodel.datasets.scenarios import MIN_DP_ROWS, federation
from fedmodel.dp_modes import grad_sample_mode
from fedmodel.models import ClassifierLoss, build_model
from fedmodel.task import MetricKind, Site, Task
from fedmodel.training import select_device

TABULAR_TASK = "fedmodel-tabular"


def tabular_dataset(data: TabularData) -> TensorDataset:
    """(features, labels) as float32 tensors: what a table trains and is scored on."""
    return TensorDataset(*data.tensors())


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row squared error of a one-output regression model."""
    return (outputs.reshape(len(outputs), -1)[:, 0] - targets).square()


def tabular_task(config: RunConfig) -> Task:
    """The Task a built-in scenario (or `simulate csv`) names in `config`."""
    found = federation(config)
    num_features, num_classes = found.test.num_features, found.test.num_classes
    kind: MetricKind
    if config.task == "regression":
        kind, loss = "regression", squared_error
    else:
        kind = "binary" if num_classes == 2 else "multiclass"
        loss = ClassifierLoss(reduction="none")

    def model() -> torch.nn.Module:
        return build_model(config.model, num_features, num_classes)

    def train_data(site: Site) -> TensorDataset:
        return tabular_dataset(found.clients[site.partition_id])

    def test_data(seed: int) -> TensorDataset:
        return tabular_dataset(found.test)

    notes: dict[str, object] = {
        "natural_sites": found.natural_sites,
        "too_small_to_train": list(found.too_small),
        "min_dp_rows": MIN_DP_ROWS,
        "achievable_auroc": found.achievable_auroc,
    }
    return Task(
        name=TABULAR_TASK,
        model=model,
        loss=loss,
        train_data=train_data,
        test_data=test_data,
        metrics=kind,
        num_sites=len(found.clients) if config.sites_from_data else None,
        site_names=found.site_names,
        version=__version__,
        grad_sample_mode=grad_sample_mode(config.model, select_device(config.device).type),
        notes=notes,
    )
