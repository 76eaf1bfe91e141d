"""`fedmodel simulate csv`: the user's own table as a federation, validated up front.

Reading and encoding reuse a deployed node's loader (`fedmodel.local_tables.read_table`), so a
file that simulates is a file a node can train on. Every problem with the user's file is
one line and exit code 2 (a bad input, like a bad option), never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedmodel.config.keys import Task
from fedmodel.datasets.tables import Split, split_table
from fedmodel.errors import ConfigError, DataError
from fedmodel.local_tables import read_table

NUMERIC_SHARE = 0.9  # a text column this numeric is a numeric column with bad cells


def load_csv_split(path: str, label: str, partition_by: str | None, task: Task = "binary") -> Split:
    """The file's train/test split; with `partition_by`, each training row's client.

    `task` "multiclass" reads the label's distinct values as classes (in sorted order);
    "regression" keeps its numbers.
    """
    if not path or not label:
        raise ConfigError("simulate csv needs --data FILE and --label COLUMN")
    try:
        features, labels, classes = read_table(Path(path), label, task)
    except DataError as error:
        raise ConfigError(str(error)) from None
    _require_a_varying_label(labels, label, path, task)
    _reject_garbage_in_numeric_columns(features, path)
    if partition_by is not None:
        _check_partition_column(features, partition_by, label, path)
    try:
        split = split_table(
            features,
            labels,
            label,
            classes,
            site_column=partition_by,
            regression=task == "regression",
        )
    except DataError as error:
        raise ConfigError(str(error)) from None
    if split.train_sites is not None:
        empty = sorted(set(split.site_names) - set(split.train_sites.tolist()))
        if empty:
            shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
            raise ConfigError(
                f"--partition-by {partition_by} makes {len(empty)} client(s) with no training "
                f"rows ({shown}); merge those values into larger groups or drop their rows"
            )
    return split


def _require_a_varying_label(labels: np.ndarray, label: str, path: str, task: Task) -> None:
    """A classifier needs two classes; a regression a label that is not constant."""
    if len(np.unique(labels)) >= 2:
        return
    if task == "regression":
        raise ConfigError(
            f"label column '{label}' in {path} is constant ({labels[0]:g}); "
            "a regression needs a label that varies"
        )
    raise ConfigError(
        f"label column '{label}' in {path} has only one class; "
        "a classifier needs rows of at least two classes"
    )


def _reject_garbage_in_numeric_columns(features: pd.DataFrame, path: str) -> None:
    """A text column that is almost all numbers holds typos, not categories: say where."""
    for name in features.columns:
        column = features[name]
        if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            continue
        present = column.dropna().astype(str).str.strip()
        parsed = pd.to_numeric(present, errors="coerce")
        bad = parsed.isna()
        if len(present) and bad.any() and 1 - bad.mean() >= NUMERIC_SHARE:
            row = present.index[bad.to_numpy()][0]
            raise ConfigError(
                f"column '{name}' in {path} is numeric but data row {int(row) + 1} holds "
                f"'{present[row]}' ({int(bad.sum())} such cell(s)); fix or empty those cells"
            )


def _check_partition_column(features: pd.DataFrame, column: str, label: str, path: str) -> None:
    if column == label:
        raise ConfigError(f"--partition-by cannot be the label column '{label}'")
    if column not in features.columns:
        shown = ", ".join(str(c) for c in list(features.columns)[:12])
        raise ConfigError(f"--partition-by column '{column}' is not in {path} (columns: {shown})")
    missing = int(features[column].isna().sum())
    if missing:
        raise ConfigError(
            f"--partition-by column '{column}' is empty in {missing} row(s): every row needs "
            "a client; fill or drop those rows"
        )
