"""The Task API: bring your own PyTorch model, data and per-sample loss.

A `Task` is everything FedModel needs from a user's code, and nothing else: a model
factory, each client's training rows as a torch `Dataset`, a test set, a per-sample
loss and how to score predictions. Everything FedModel adds applies to every task the
same way, the built-in scenarios included (fedmodel/datasets/tabular_task.py builds
theirs): DP-SGD on every local step, owner ledgers and budgets, audit, robust
aggregation, SecAgg+, client-level DP, checkpoints and resume, baselines and reports.

What FedModel guarantees around the code a task supplies:

- **DP on every step.** Every optimizer step of local training is a DP-SGD step
  (Opacus): each sample's gradient is clipped to `--max-grad-norm`, Gaussian noise is
  added, batches are Poisson samples, and the step is accounted in the data owner's
  ledger before the update leaves. A model Opacus cannot compute per-sample gradients
  for (BatchNorm, a plain nn.LSTM) is refused before any training (`--fix-model`
  swaps in DP-compatible layers).
- **The data never leaves.** `train_data` and `local_data` run on the client that holds
  the rows; `test_data` is the simulation's server-side test set, never a client's.
- **What is released.** The model after local DP-SGD, the client's example count, its
  training loss and the epsilon spent (and, in deployment, metrics on the node's own
  held-out rows). Nothing else about the rows leaves the client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fedmodel.lazy_sequence import LazySequence
from fedmodel.table_schema import TableSchema

MetricKind = Literal["binary", "multiclass", "regression"]
"""Built-in scoring: binary (one logit per row), multiclass (one logit per class,
targets are class indices) or regression (one output per row)."""
MetricFunction = Callable[[np.ndarray, np.ndarray], float]
"""A user metric: (model outputs, targets) of the whole test set -> one number."""
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(outputs, targets) of a batch of B rows -> B losses, one per row (not their mean):
DP-SGD clips each row's gradient separately."""

CLASSIFIER_METRICS = ("auroc", "auprc", "recall_at_1pct_fpr", "accuracy")
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "binary": CLASSIFIER_METRICS,
    "multiclass": CLASSIFIER_METRICS,
    "regression": ("r2", "mse", "mae"),
}
"""What fedmodel.evaluation.evaluate reports for each built-in kind, besides "loss";
the first is the one reports lead with."""
LOWER_IS_BETTER = frozenset({"loss", "mse", "mae"})


@dataclass(frozen=True)
class Site:
    """Which simulated client asks for its training rows, and the run's seed."""

    partition_id: int  # 0 .. num_partitions - 1
    num_partitions: int
    seed: int


@dataclass(frozen=True)
class Task:
    """A federated learning task: a model, the rows to train and test it on, a loss.

    - `model()` returns a fresh, untrained model; every client and the server call it,
      so it must build the same architecture every time.
    - `train_data(site)` returns one simulated client's training rows, a Dataset of
      (input, target) pairs; `test_data(seed)` the server's test set (simulation).
    - `loss(outputs, targets)` returns one loss per row.
    - `metrics` is a `MetricKind` or a mapping of names to `MetricFunction`s; the loss
      is always reported as "loss". `headline` names the metric reports lead with
      (default: AUROC for classifiers, R2 for regression, else the first metric).
    - `num_sites`: the number of clients, when the data fixes it (natural sites);
      None lets `--clients` choose. `site_names` labels them in reports.
    - `local_data(path)`: a deployed node's rows, read from the file or directory its
      owner points the node at (None: the task runs in simulation only).
    - `version` is what a node owner approves, with the hash of the installed source.
    - `grad_sample_mode`: how Opacus computes per-sample gradients ("hooks" works for
      every layer Opacus supports); it changes speed, never the privacy guarantee.
    - `table`: when the model's inputs are a table's columns, which ones and how they are
      encoded (fedmodel.table_schema); the saved model keeps it, so `fedmodel predict`
      scores a raw CSV or Parquet file. None: the model scores tensors only.
    """

    name: str
    model: Callable[[], nn.Module]
    loss: PerSampleLoss
    train_data: Callable[[Site], Dataset]
    test_data: Callable[[int], Dataset]
    metrics: MetricKind | Mapping[str, MetricFunction] = "binary"
    headline: str = ""
    num_sites: int | None = None
    site_names: tuple[str, ...] = ()
    local_data: Callable[[Path], Dataset] | None = None
    version: str = "0"
    grad_sample_mode: str = "hooks"
    table: TableSchema | None = None
    notes: Mapping[str, object] = field(default_factory=dict)
    """Facts about the data that reports print (e.g. sites left out for size)."""

    @property
    def headline_metric(self) -> str:
        """The metric reports and progress lines lead with."""
        return self.headline or next(iter(self.metric_names), "loss")

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics evaluation reports, besides "loss", in the order reports show them."""
        if isinstance(self.metrics, str):
            return METRIC_NAMES[self.metrics]
        return tuple(self.metrics)


def client_datasets(task: Task, clients: int, seed: int) -> Sequence[Dataset]:
    """Every simulated client's training rows, built only when indexed."""
    return LazySequence(clients, lambda index: task.train_data(Site(index, clients, seed)))
