"""Mergeable sufficient statistics of a table's features, and the bounds an honest one keeps.

A federation standardises and one-hot encodes every node's table with the merged
statistics of all of them, without pooling rows (server/deployment.py, client/local_data.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmodel.errors import DataError

MAX_CATEGORIES = 50  # more distinct values than this is an identifier or free text
# Bounds on one table's FeatureStatistics: a node's statistics outside them cannot be an
# honest table's (or would swamp every node's encoding) and leave that node out of a run
MAX_COLUMNS = 1000
MAX_CATEGORY_LENGTH = 200  # characters of one category value
MAX_TABLE_ROWS = 10**9
MAX_ABS_VALUE = 1e12  # the largest magnitude of a numeric value the sums may imply


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
