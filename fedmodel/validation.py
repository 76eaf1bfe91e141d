"""A validation split for model selection: held-out training rows stand in for the test set.

Choosing hyperparameters by their test score, then reporting that score, overstates it
(the choice is fitted to the test set). With `--validation-fraction f` a run holds out a
seeded share f of each client's own training rows, trains on the rest, and is scored on
every client's held-out rows pooled, in place of the test set: the task's `test_data` is
never called, so nothing a sweep selects on (fedmodel sweep) comes from the test set.

The split is per client, so every site is represented in the validation rows as in
training, and it depends only on the run's seed and the client's index: the server and
every worker process derive the same one without talking.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from fedmodel.data import row_count
from fedmodel.task import Site, Task

VALIDATION_STREAM = 20_261_130
"""Mixed into the split's seed, so that it shares no draws with the run's other randomness."""


def held_out_rows(rows: int, fraction: float, site: Site) -> np.ndarray:
    """Which of a client's `rows` training rows are held out (sorted indices): round(rows *
    fraction) of them, at least one and never all, drawn from the run seed and client."""
    count = min(rows - 1, max(1, round(rows * fraction)))
    rng = np.random.default_rng([VALIDATION_STREAM, site.seed, site.partition_id])
    return np.sort(rng.choice(rows, size=count, replace=False))


def validation_task(task: Task, fraction: float, clients: int) -> Task:
    """`task` with each of its `clients` clients training on all but a held-out share
    `fraction` of its rows, and scored on those held-out rows of every client."""

    def split(site: Site) -> tuple[Dataset, Dataset]:
        data = task.train_data(site)
        rows = row_count(data)
        held = np.zeros(rows, dtype=bool)
        held[held_out_rows(rows, fraction, site)] = True
        return _rows(data, np.flatnonzero(~held)), _rows(data, np.flatnonzero(held))

    def train_data(site: Site) -> Dataset:
        return split(site)[0]

    def validation_data(seed: int) -> Dataset:
        return _pooled([split(Site(index, clients, seed))[1] for index in range(clients)])

    notes = {**task.notes, "validation_fraction": fraction}
    return dataclasses.replace(task, train_data=train_data, test_data=validation_data, notes=notes)


def _rows(data: Dataset, indices: np.ndarray) -> Dataset:
    """These rows of `data`; a TensorDataset stays one (batches stay slices of a tensor)."""
    if isinstance(data, TensorDataset):
        chosen = torch.as_tensor(indices, dtype=torch.long)
        return TensorDataset(*(tensor[chosen] for tensor in data.tensors))
    return Subset(data, indices.tolist())


def _pooled(parts: Sequence[Dataset]) -> Dataset:
    if all(isinstance(part, TensorDataset) for part in parts):
        columns = zip(*(part.tensors for part in parts), strict=True)  # type: ignore[attr-defined]
        return TensorDataset(*(torch.cat(column) for column in columns))
    return ConcatDataset(parts)
