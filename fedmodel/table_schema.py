"""What a model trained on a table expects of a new table, and what its outputs mean.

A model is only usable with the encoding it was trained with: the same columns, the same
means and deviations, the same one-hot vocabularies, the same class order. A
`TableSchema` is that record. Training builds it (fedmodel.datasets, a deployed run's
query round), the model file stores it (fedmodel.model_file), and `fedmodel predict`
encodes a new file with it through the very encoder training used
(`fedmodel.local_tables.encode_table`), after the same column checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmodel.errors import DataError
from fedmodel.feature_statistics import FeatureStatistics
from fedmodel.local_tables import BINARY_CLASSES, encode_table

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class TableSchema:
    """The columns a model reads and how, its label and the order of its classes.

    - `statistics`: the encoding's source (means and deviations of numeric columns, the
      vocabularies of text columns), as a federation merged them: the model's inputs are
      standardised numbers (missing: the mean) and one-hot categories (unseen or
      missing: all zeros). None: the model reads `raw_columns`, numbers as they are.
    - `classes`: what the model's outputs are, in order ("0", "1" for a binary label;
      empty for a regression, whose one output is the prediction itself).
    """

    label: str
    classes: tuple[str, ...] = BINARY_CLASSES
    statistics: FeatureStatistics | None = None
    raw_columns: tuple[str, ...] = ()

    @property
    def numeric_columns(self) -> tuple[str, ...]:
        """The columns that must hold numbers."""
        if self.statistics is None:
            return self.raw_columns
        return tuple(sorted(self.statistics.numeric))

    @property
    def input_columns(self) -> tuple[str, ...]:
        """Every column the model reads: numbers first, then text columns."""
        if self.statistics is None:
            return self.raw_columns
        return (*self.numeric_columns, *sorted(self.statistics.categories))

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The model's input features, in order (one per one-hot category value)."""
        if self.statistics is None:
            return self.raw_columns
        return self.statistics.feature_names()

    def encode(self, frame: pd.DataFrame, source: str | Path) -> np.ndarray:
        """`frame`'s rows as the model's float32 inputs; a DataError names a missing,
        unexpected or mistyped column of `source` and the fix.

        The label column and an identifier column are the caller's to drop first.
        """
        self.check_columns(frame, source)
        if self.statistics is None:
            values = frame[list(self.raw_columns)].astype("float64").to_numpy(na_value=np.nan)
            if not np.isfinite(values).all():
                raise DataError(
                    f"{source} has missing values; this model reads its columns as they are "
                    "and has no imputation: fill those cells"
                )
            return values.astype(np.float32)
        labels = np.zeros(len(frame), dtype=np.float32)
        return encode_table(frame, labels, self.statistics).features

    def check_columns(self, frame: pd.DataFrame, source: str | Path) -> None:
        """Every input column present, no other, and numbers where numbers belong."""
        import pandas as pd

        expected = self.input_columns
        missing = [name for name in expected if name not in frame.columns]
        if missing:
            raise DataError(
                f"{source} lacks column(s) the model reads: {', '.join(missing)} "
                f"(it reads: {_shown(expected)})"
            )
        extra = [str(name) for name in frame.columns if name not in expected]
        if extra:
            raise DataError(
                f"{source} has column(s) the model was not trained on: {', '.join(extra[:6])}; "
                f"drop them (it reads: {_shown(expected)})"
            )
        for name in self.numeric_columns:
            column = frame[name]
            if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
                continue
            present = column.dropna().astype(str).str.strip()
            bad = pd.to_numeric(present, errors="coerce").isna()
            if not bad.any():
                raise DataError(
                    f"column '{name}' in {source} holds numbers stored as text; store them as "
                    "numbers"
                )
            row = present.index[bad.to_numpy()][0]
            raise DataError(
                f"column '{name}' in {source} must be numeric, but data row {int(row) + 1} "
                f"holds '{present[row]}'; fix or empty that cell"
            )

    def to_json(self) -> dict[str, Any]:
        import json

        return {
            "label": self.label,
            "classes": list(self.classes),
            "statistics": None
            if self.statistics is None
            else json.loads(self.statistics.to_json()),
            "raw_columns": list(self.raw_columns),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TableSchema:
        """Read `to_json`'s form (a TypeError or KeyError is the caller's to report)."""
        import json

        statistics = raw["statistics"]
        return cls(
            label=str(raw["label"]),
            classes=tuple(str(name) for name in raw["classes"]),
            statistics=None
            if statistics is None
            else FeatureStatistics.from_json(json.dumps(statistics)),
            raw_columns=tuple(str(name) for name in raw["raw_columns"]),
        )


def _shown(names: tuple[str, ...]) -> str:
    return ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
