"""Tabular data as tensors, and its partitioning across simulated clients.

Reading a local CSV/Parquet table is `fedmodel.local_tables`; the statistics a federation
encodes with are `fedmodel.feature_statistics`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmodel.errors import DataError

if TYPE_CHECKING:  # torch is imported where tensors are made: reading and checking a
    # table (`fedmodel client start`, `predict`) needs only NumPy and pandas
    import torch
    from torch.utils.data import DataLoader, Dataset, TensorDataset


@dataclass(frozen=True)
class TabularData:
    """Standardised float features and class labels of one client or one test set.

    Labels are 0/1 for a binary task and class indices for a multiclass one;
    `num_classes` is the task's, not this part's: a client may hold only some classes.
    """

    features: np.ndarray
    labels: np.ndarray
    feature_names: tuple[str, ...]
    num_classes: int = 2

    def __post_init__(self) -> None:
        if len(self.features) != len(self.labels):
            raise ValueError("features and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    def subset(self, indices: np.ndarray) -> TabularData:
        return TabularData(
            self.features[indices], self.labels[indices], self.feature_names, self.num_classes
        )

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        return (
            torch.as_tensor(self.features, dtype=torch.float32),
            torch.as_tensor(self.labels, dtype=torch.float32),
        )

    def dataset(self) -> TensorDataset:
        """(features, labels) rows as float32 tensors: what training and scoring take."""
        from torch.utils.data import TensorDataset

        return TensorDataset(*self.tensors())


def make_loader(
    data: Dataset, batch_size: int, seed: int, device: torch.device | None = None
) -> DataLoader:
    """A shuffling loader; DP-SGD replaces its sampler with Poisson sampling.

    A TensorDataset moves to `device` once, so batches are cut on the device (no copy
    per batch); other datasets are batched on the CPU and moved per step. The shuffling
    generator stays on the CPU, as samplers need.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    if isinstance(data, TensorDataset) and device is not None:
        data = TensorDataset(*(tensor.to(device) for tensor in data.tensors))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)


def row_count(data: Dataset) -> int:
    """How many rows a map-style dataset holds (torch's Dataset type declares no len)."""
    return len(data)  # type: ignore[arg-type]


def dataset_tensors(data: Dataset) -> tuple[torch.Tensor, ...]:
    """Every row of `data` stacked: (inputs, targets), for fingerprints and statistics.

    A TensorDataset's own tensors; any other dataset is read item by item once.
    """
    from torch.utils.data import TensorDataset, default_collate

    if isinstance(data, TensorDataset):
        return tuple(data.tensors)
    return tuple(default_collate([data[i] for i in range(len(data))]))  # type: ignore[arg-type]


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    alpha: float,
    seed: int,
    min_rows: int = 2,
) -> list[np.ndarray]:
    """Row indices of each partition, from flwr-datasets partitioners on a local table.

    Rows are shuffled first: the IID partitioner shards contiguously, and some tables
    ship sorted by label. `min_rows`: dirichlet draws again until every partition has
    at least this many rows (the other schemes leave the check to the caller).
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        Partitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    if num_partitions > len(labels):
        raise DataError(
            f"cannot split {len(labels)} training rows across {num_partitions} clients; "
            f"use --clients {len(labels)} or fewer"
        )
    order = np.random.default_rng(seed).permutation(len(labels))
    table = Dataset.from_dict({"row": order, "label": labels[order].astype(int)})
    partitioner: Partitioner
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_rows,
            seed=seed,
        )
    elif scheme == "shard":  # McMahan et al. 2017: label-sorted shards, two per client
        partitioner = ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=2,
            seed=seed,
        )
    elif scheme == "pathological":  # every client holds exactly two classes
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=2,
            class_assignment_mode="first-deterministic",  # every class is used
            seed=seed,
        )
    else:
        raise DataError(
            f"unknown partition scheme '{scheme}'; use iid, dirichlet, shard or pathological"
        )
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():  # its retries under min_rows: our error says what to do
            warnings.filterwarnings("ignore", message=".*min_partition_size.*")
            return [
                np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
                for i in range(num_partitions)
            ]
    except ValueError as error:
        raise DataError(
            f"{scheme} partitioning into {num_partitions} clients failed ({error}); "
            "use fewer --clients or a larger --alpha"
        ) from None
