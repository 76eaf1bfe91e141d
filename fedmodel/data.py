"""Tabular data as tensors: local CSV/Parquet tables, and partitioning across simulated clients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmodel.errors import DataError

if TYPE_CHECKING:
    import pandas as pd


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
        return (
            torch.as_tensor(self.features, dtype=torch.float32),
            torch.as_tensor(self.labels, dtype=torch.float32),
        )


def make_loader(
    data: TabularData, batch_size: int, seed: int, device: torch.device | None = None
) -> DataLoader:
    """A shuffling loader; Opacus replaces its sampler with Poisson sampling under DP.

    With `device`, the rows are moved there once, so batches are cut on the device
    (no copy per batch); the shuffling generator stays on the CPU, as samplers need.
    """
    features, labels = (tensor.to(device) for tensor in data.tensors())
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(features, labels), batch_size=batch_size, shuffle=True, generator=generator
    )


def partition_indices(
    labels: np.ndarray, num_partitions: int, scheme: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Row indices of each partition, from flwr-datasets partitioners on a local table.

    Rows are shuffled first: the IID partitioner shards contiguously, and some tables
    ship sorted by label.
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
            min_partition_size=2,
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
        return [
            np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
            for i in range(num_partitions)
        ]
    except ValueError as error:
        raise DataError(
            f"{scheme} partitioning into {num_partitions} clients failed ({error}); "
            "use fewer --clients or a larger --alpha"
        ) from None


# --- local tables (CSV / Parquet): deployment clients and `simulate csv` -------------

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
MAX_CATEGORIES = 50  # more distinct values than this is an identifier or free text
# Bounds on one table's FeatureStatistics: a node's statistics outside them cannot be an
# honest table's (or would swamp every node's encoding) and leave that node out of a run
MAX_COLUMNS = 1000
MAX_CATEGORY_LENGTH = 200  # characters of one category value
MAX_TABLE_ROWS = 10**9
MAX_ABS_VALUE = 1e12  # the largest magnitude of a numeric value the sums may imply
MAX_CLASSES = 100  # a multiclass label with more values is an identifier or a number
_TRUE_LABELS = frozenset({"1", "1.0", "true", "yes", "y", "t"})
_FALSE_LABELS = frozenset({"0", "0.0", "false", "no", "n", "f"})


@dataclass(frozen=True)
class FeatureStatistics:
    """Sufficient statistics of a table's features: what encoding needs, and mergeable.

    Numeric columns keep (count of present values, sum, sum of squares), so the
    statistics of several clients add up to those of their union: that is how a
    federation standardises with global means and deviations without pooling rows.
    Categorical columns keep their sorted vocabulary (union on merge). These are
    aggregates of raw data and are NOT covered by the DP guarantee of training.
    """

    numeric: dict[str, tuple[int, float, float]]
    categories: dict[str, tuple[str, ...]]
    rows: int

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Statistics of both tables together; columns must agree in kind."""
        for name in set(self.numeric) & set(other.categories) | (
            set(self.categories) & set(other.numeric)
        ):
            raise DataError(f"column '{name}' is numeric in one table and categorical in another")
        numeric = dict(self.numeric)
        for name, (count, total, squares) in other.numeric.items():
            mine = numeric.get(name, (0, 0.0, 0.0))
            numeric[name] = (mine[0] + count, mine[1] + total, mine[2] + squares)
        categories = dict(self.categories)
        for name, values in other.categories.items():
            categories[name] = tuple(sorted(set(categories.get(name, ())) | set(values)))
        return FeatureStatistics(numeric, categories, self.rows + other.rows)

    def mean_and_std(self, column: str) -> tuple[float, float]:
        count, total, squares = self.numeric[column]
        if count == 0:
            return 0.0, 1.0
        mean = total / count
        variance = max(squares / count - mean * mean, 0.0) * count / max(count - 1, 1)
        std = float(np.sqrt(variance))
        return mean, std if std > 1e-12 else 1.0

    def feature_names(self) -> tuple[str, ...]:
        """Encoded column order: numeric columns, then one column per category value."""
        names = sorted(self.numeric)
        for column in sorted(self.categories):
            names += [f"{column}={value}" for value in self.categories[column]]
        return tuple(names)

    def to_json(self) -> str:
        import json

        return json.dumps(
            {
                "numeric": {k: list(v) for k, v in self.numeric.items()},
                "categories": {k: list(v) for k, v in self.categories.items()},
                "rows": self.rows,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> FeatureStatistics:
        """Read `to_json`'s form; anything else (another party's bytes) is a DataError."""
        import json

        try:
            raw = json.loads(text)
            return cls(
                numeric={
                    str(k): (int(count), float(total), float(squares))
                    for k, (count, total, squares) in raw["numeric"].items()
                },
                categories={
                    str(k): tuple(_text(x) for x in v) for k, v in raw["categories"].items()
                },
                rows=int(raw["rows"]),
            )
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as error:
            raise DataError(f"malformed feature statistics: {error!r}"[:300]) from None

    def bounds_violation(self) -> str | None:
        """Why these cannot be one honest table's statistics; None when they can.

        Bounds: at most MAX_COLUMNS columns and MAX_CATEGORIES values per text column
        (what `describe_table` lets through), values of at most MAX_CATEGORY_LENGTH
        characters, 1 to MAX_TABLE_ROWS rows, counts at most the rows, finite sums that
        values of magnitude at most MAX_ABS_VALUE can reach, and sums of squares that
        fit the sums (Cauchy-Schwarz: total^2 <= count * squares).
        """
        if not 1 <= self.rows <= MAX_TABLE_ROWS:
            return f"{self.rows} rows is outside [1, {MAX_TABLE_ROWS}]"
        if len(self.numeric) + len(self.categories) > MAX_COLUMNS:
            return f"{len(self.numeric) + len(self.categories)} columns (at most {MAX_COLUMNS})"
        for name, values in self.categories.items():
            if len(values) > MAX_CATEGORIES:
                return f"column '{name}' has {len(values)} categories (at most {MAX_CATEGORIES})"
            if any(len(value) > MAX_CATEGORY_LENGTH for value in values):
                return f"column '{name}' has a category longer than {MAX_CATEGORY_LENGTH}"
        for name, (count, total, squares) in self.numeric.items():
            if not 0 <= count <= self.rows:
                return f"column '{name}' counts {count} values in {self.rows} rows"
            if not (np.isfinite(total) and np.isfinite(squares)):
                return f"column '{name}' has non-finite sums"
            if abs(total) > count * MAX_ABS_VALUE or not 0 <= squares <= count * MAX_ABS_VALUE**2:
                return f"column '{name}' has sums beyond values of magnitude {MAX_ABS_VALUE:g}"
            if total * total > count * squares * (1 + 1e-9) + 1e-9:
                return f"column '{name}' has a sum of squares no table can have"
        return None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a category value must be text, got {type(value).__name__}")
    return value


def load_table(
    path: str | Path, label: str, statistics: FeatureStatistics | None = None
) -> TabularData:
    """Load a CSV or Parquet file as standardised features and a binary label.

    Numeric and boolean columns become features; text columns are one-hot encoded
    (missing = all zeros); missing numbers are imputed with the mean, i.e. 0 after
    standardisation. With `statistics` (e.g. merged across a federation) the table is
    encoded with those means, deviations and vocabularies, so every client produces
    the same columns; without, with its own. Problems raise one-line DataErrors.
    """
    frame, labels = read_table(path, label)
    if statistics is None:
        statistics = describe_table(frame)
    return encode_table(frame, labels, statistics)


def table_statistics(path: str | Path, label: str) -> FeatureStatistics:
    """The FeatureStatistics of a file's features (the label is checked, not described)."""
    frame, _ = read_table(path, label)
    return describe_table(frame)


def read_table(
    path: str | Path, label: str, multiclass: bool = False
) -> tuple[pd.DataFrame, np.ndarray]:
    """The feature columns and the labels of a file, validated: 0/1 for a binary task,
    class indices (in sorted order of the label's values) for a multiclass one."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; name the CSV or Parquet file inside it")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"data file {path} must be .csv or .parquet (got '{suffix or path.name}')")
    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except Exception as error:  # pandas raises many kinds; all mean "unreadable"
        raise DataError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if label not in frame.columns:
        shown = ", ".join(str(c) for c in list(frame.columns)[:12])
        raise DataError(f"label column '{label}' is not in {path} (columns: {shown})")
    if len(frame) == 0:
        raise DataError(f"data file {path} has no rows")
    _reject_missing_labels(frame[label], label, path)
    labels = (_class_labels if multiclass else _binary_labels)(frame[label], label, path)
    features = frame.drop(columns=[label])
    if features.shape[1] == 0:
        raise DataError(f"data file {path} has no feature columns besides '{label}'")
    return features, labels


def describe_table(frame: pd.DataFrame) -> FeatureStatistics:
    """Local FeatureStatistics of validated feature columns."""
    numeric: dict[str, tuple[int, float, float]] = {}
    categories: dict[str, tuple[str, ...]] = {}
    for name in frame.columns:
        column = frame[name]
        if _is_numeric(column):
            values = _numeric_values(column)
            present = values[np.isfinite(values)]
            numeric[str(name)] = (
                int(present.size),
                float(present.sum()),
                float(np.square(present).sum()),
            )
        else:
            vocabulary = sorted({str(v) for v in column.dropna().unique()})
            if len(vocabulary) > MAX_CATEGORIES:
                raise DataError(
                    f"column '{name}' has {len(vocabulary)} distinct text values (more than "
                    f"{MAX_CATEGORIES}): drop it if it is an identifier, or encode it as numbers"
                )
            categories[str(name)] = tuple(vocabulary)
    return FeatureStatistics(numeric, categories, len(frame))


def encode_table(
    frame: pd.DataFrame, labels: np.ndarray, statistics: FeatureStatistics, num_classes: int = 2
) -> TabularData:
    """Features in `statistics`' column order: standardised numbers, one-hot categories."""
    missing = [c for c in [*statistics.numeric, *statistics.categories] if c not in frame.columns]
    if missing:
        raise DataError(f"data file lacks column(s) the federation uses: {', '.join(missing)}")
    blocks = []
    for name in sorted(statistics.numeric):
        if not _is_numeric(frame[name]):
            raise DataError(f"column '{name}' must be numeric (it holds text here)")
        mean, std = statistics.mean_and_std(name)
        values = _numeric_values(frame[name])
        values = np.where(np.isfinite(values), values, mean)
        blocks.append(((values - mean) / std)[:, None])
    for name in sorted(statistics.categories):
        column = frame[name].astype("string")
        vocabulary = statistics.categories[name]
        blocks.append(
            np.stack([(column == v).fillna(False).to_numpy(dtype=bool) for v in vocabulary], 1)
            if vocabulary
            else np.zeros((len(frame), 0))
        )
    features = np.concatenate(blocks, axis=1).astype(np.float32)
    return TabularData(features, labels, statistics.feature_names(), num_classes)


def _is_numeric(column: pd.Series) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column))


def _numeric_values(column: pd.Series) -> np.ndarray:
    return column.astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)


def _reject_missing_labels(column: pd.Series, label: str, path: Path) -> None:
    if column.isna().any():
        raise DataError(
            f"label column '{label}' in {path} has {int(column.isna().sum())} missing value(s); "
            "drop or fill those rows"
        )


def _class_labels(column: pd.Series, label: str, path: Path) -> np.ndarray:
    names, indices = np.unique(column.astype(str).str.strip().to_numpy(), return_inverse=True)
    if len(names) > MAX_CLASSES:
        raise DataError(
            f"label column '{label}' in {path} has {len(names)} distinct values (more than "
            f"{MAX_CLASSES}): is it an identifier or a number to regress rather than a class?"
        )
    return indices.astype(np.float32)


def _binary_labels(column: pd.Series, label: str, path: Path) -> np.ndarray:
    text = column.astype(str).str.strip().str.lower()
    ones, zeros = text.isin(_TRUE_LABELS), text.isin(_FALSE_LABELS)
    if not (ones | zeros).all():
        found = ", ".join(sorted(set(column.astype(str)))[:6])
        raise DataError(
            f"label column '{label}' in {path} must be binary (0/1, true/false, yes/no); "
            f"found: {found} (for more than two classes use --task multiclass)"
        )
    return ones.to_numpy().astype(np.float32)
