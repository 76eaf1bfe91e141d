"""A registered model on standardised table rows, as a Task: the built-in scenarios'
model, loss and metrics, and what a deployed node and its coordinator train.

Kept apart from the scenario catalogue (fedmodel/datasets) so that a deployed node or
ServerApp, whose rows come from the nodes' own files, never loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from fedmodel import __version__
from fedmodel.config import TABULAR_TASK, RunConfig
from fedmodel.dp_modes import grad_sample_mode
from fedmodel.errors import DataError
from fedmodel.models import ClassifierLoss, build_model
from fedmodel.task import MetricKind, PerSampleLoss, Site, Task
from fedmodel.training import select_device


def _no_rows(_: object) -> Dataset:
    raise DataError("a deployed table task reads its rows from the node's own file")


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row squared error of a one-output regression model."""
    return (outputs.reshape(len(outputs), -1)[:, 0] - targets).square()


def table_task(
    config: RunConfig,
    num_features: int,
    num_classes: int,
    train_data: Callable[[Site], Dataset] = _no_rows,
    test_data: Callable[[int], Dataset] = _no_rows,
    **details: Any,
) -> Task:
    """A registered model (`config.model`) on standardised table rows of `num_features`
    columns: the loss and metrics follow the label (`config.task`, `num_classes`).

    A deployed node and the coordinator build it from the federation's encoded width
    (their rows come from the node's own file, not from a `train_data`).
    """
    kind: MetricKind
    loss: PerSampleLoss
    if config.task == "regression":
        kind, loss = "regression", squared_error
    else:
        kind = "binary" if num_classes == 2 else "multiclass"
        loss = ClassifierLoss(reduction="none")

    def model() -> torch.nn.Module:
        return build_model(config.model, num_features, num_classes)

    return Task(
        name=TABULAR_TASK,
        model=model,
        loss=loss,
        train_data=train_data,
        test_data=test_data,
        metrics=kind,
        version=__version__,
        grad_sample_mode=grad_sample_mode(config.model, select_device(config.device).type),
        **details,
    )
