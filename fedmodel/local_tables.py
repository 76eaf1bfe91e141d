"""Local tables (CSV / Parquet) as tensors: what a deployed node and `simulate csv` read.

Problems with a file (missing, unreadable, a bad label column, an identifier-like text
column) raise one-line DataErrors before anything trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmodel.data import TabularData
from fedmodel.errors import DataError
from fedmodel.feature_statistics import MAX_CATEGORIES, FeatureStatistics

if TYPE_CHECKING:
    import pandas as pd

    from fedmodel.config.keys import Task

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
BINARY_CLASSES = ("0", "1")
"""A binary label's classes, in the order of their indices (1: true, yes)."""
MAX_CLASSES = 100  # a multiclass label with more values is an identifier or a number
_TRUE_LABELS = frozenset({"1", "1.0", "true", "yes", "y", "t"})
_FALSE_LABELS = frozenset({"0", "0.0", "false", "no", "n", "f"})


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
    frame, labels, _ = read_table(path, label)
    if statistics is None:
        statistics = describe_table(frame)
    return encode_table(frame, labels, statistics)


def table_statistics(path: str | Path, label: str) -> FeatureStatistics:
    """The FeatureStatistics of a file's features (the label is checked, not described)."""
    frame, _, _ = read_table(path, label)
    return describe_table(frame)


def read_table(
    path: str | Path, label: str, task: Task = "binary"
) -> tuple[pd.DataFrame, np.ndarray, tuple[str, ...]]:
    """The feature columns, the labels and the classes of a file, validated: 0/1 for a
    binary task (classes "0", "1"), class indices (in sorted order of the label's values,
    which are the classes) for a multiclass one, the numbers themselves for a regression
    (no classes)."""
    path = Path(path)
    frame = read_frame(path)
    if label not in frame.columns:
        shown = ", ".join(str(c) for c in list(frame.columns)[:12])
        raise DataError(f"label column '{label}' is not in {path} (columns: {shown})")
    _reject_missing_labels(frame[label], label, path)
    labels, classes = _LABEL_READERS[task](frame[label], label, path)
    features = frame.drop(columns=[label])
    if features.shape[1] == 0:
        raise DataError(f"data file {path} has no feature columns besides '{label}'")
    return features, labels, classes


def read_frame(path: Path) -> pd.DataFrame:
    """Every column of a CSV or Parquet file with at least one row; DataError if not."""
    import pandas as pd

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
    if len(frame) == 0:
        raise DataError(f"data file {path} has no rows")
    return frame


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


def _class_labels(column: pd.Series, label: str, path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    names, indices = np.unique(column.astype(str).str.strip().to_numpy(), return_inverse=True)
    if len(names) > MAX_CLASSES:
        raise DataError(
            f"label column '{label}' in {path} has {len(names)} distinct values (more than "
            f"{MAX_CLASSES}): for a number to predict use --task regression; an identifier "
            "is no label"
        )
    return indices.astype(np.float32), tuple(str(name) for name in names)


def _binary_labels(column: pd.Series, label: str, path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    text = column.astype(str).str.strip().str.lower()
    ones, zeros = text.isin(_TRUE_LABELS), text.isin(_FALSE_LABELS)
    if not (ones | zeros).all():
        found = ", ".join(sorted(set(column.astype(str)))[:6])
        hint = (
            "for a number to predict use --task regression"
            if _is_quantity(column)
            else "for more than two classes use --task multiclass"
        )
        raise DataError(
            f"label column '{label}' in {path} must be binary (0/1, true/false, yes/no); "
            f"found: {found} ({hint})"
        )
    return ones.to_numpy().astype(np.float32), BINARY_CLASSES


def _is_quantity(column: pd.Series) -> bool:
    """A numeric label with fractions or more values than a class label has."""
    if not _is_numeric(column):
        return False
    values = _numeric_values(column)
    return bool((values != np.round(values)).any() or len(np.unique(values)) > MAX_CLASSES)


def _continuous_labels(
    column: pd.Series, label: str, path: Path
) -> tuple[np.ndarray, tuple[str, ...]]:
    """A regression's targets: finite numbers, as they are."""
    import pandas as pd

    if not _is_numeric(column):
        text = column[pd.to_numeric(column, errors="coerce").isna()].astype(str)
        found = ", ".join(sorted(set(text))[:6])
        raise DataError(
            f"label column '{label}' in {path} must be numeric for --task regression; "
            f"found text: {found}"
        )
    values = _numeric_values(column)
    if not np.isfinite(values).all():
        raise DataError(
            f"label column '{label}' in {path} has {int((~np.isfinite(values)).sum())} "
            "infinite value(s); drop or fix those rows"
        )
    return values.astype(np.float32), ()


_LABEL_READERS = {
    "binary": _binary_labels,
    "multiclass": _class_labels,
    "regression": _continuous_labels,
}
