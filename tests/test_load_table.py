"""`load_table`: a data owner's CSV/Parquet file becomes model features, or one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmodel.errors import DataError
from fedmodel.feature_statistics import FeatureStatistics
from fedmodel.local_tables import load_table, table_statistics


def _write(path: Path, frame: pd.DataFrame) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.fixture
def mixed() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [50.0, 60.0, np.nan, 70.0],
            "sex": ["F", "M", "M", None],
            "smoker": [True, False, True, False],
            "death": ["yes", "no", "no", "yes"],
        }
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_mixed_table_is_one_hot_imputed_and_standardised(
    tmp_path: Path, mixed: pd.DataFrame, suffix: str
) -> None:
    data = load_table(_write(tmp_path / f"site{suffix}", mixed), "death")
    assert data.feature_names == ("age", "smoker", "sex=F", "sex=M")
    np.testing.assert_array_equal(data.labels, [1, 0, 0, 1])
    age = data.features[:, 0]
    assert age[2] == 0.0  # missing age imputed with the mean, which standardises to 0
    np.testing.assert_allclose(age[[0, 1, 3]], [-1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(data.features[:, 2:], [[1, 0], [0, 1], [0, 1], [0, 0]])
    assert data.features.dtype == np.float32 and np.isfinite(data.features).all()


def test_flchain_csv_loads_like_the_simulation_cohort(tmp_path: Path) -> None:
    from fedmodel.datasets.medical import load_flchain_frame

    frame = load_flchain_frame()
    data = load_table(_write(tmp_path / "flchain.csv", frame), "death")
    assert len(data) == 7874 and data.labels.sum() == 2169
    assert "sex=M" in data.feature_names and "creatinine" in data.feature_names
    numeric = data.features[:, : len(data.feature_names) - 2]
    np.testing.assert_allclose(numeric.mean(0), 0, atol=1e-4)


def test_merged_statistics_equal_those_of_the_pooled_table(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"x": rng.normal(3, 2, 100), "site": rng.choice(["a", "b", "c"], 100), "y": 1}
    )
    a = _write(tmp_path / "a.csv", frame.iloc[:40])
    b = _write(tmp_path / "b.csv", frame.iloc[40:][frame.iloc[40:]["site"] != "a"])
    merged = table_statistics(a, "y").merge(table_statistics(b, "y"))
    merged = FeatureStatistics.from_json(merged.to_json())
    pooled = pd.concat([pd.read_csv(a), pd.read_csv(b)])
    mean, std = merged.mean_and_std("x")
    assert mean == pytest.approx(pooled["x"].mean()) and std == pytest.approx(pooled["x"].std())
    # both clients encode to the same columns even though b has no site "a"
    assert load_table(b, "y", merged).feature_names == ("x", "site=a", "site=b", "site=c")


@pytest.mark.parametrize(
    ("content", "label", "message"),
    [
        (None, "death", "does not exist"),
        ("age,death\n1,0\n", "outcome", "label column 'outcome' is not in"),
        ("age,death\n1,maybe\n2,0\n", "death", "must be binary"),
        ("age,death\n1,\n2,0\n", "death", "1 missing value"),
        ("death\n1\n0\n", "death", "no feature columns"),
        ("age,death\n", "death", "has no rows"),
    ],
)
def test_bad_files_are_one_line_data_errors(
    tmp_path: Path, content: str | None, label: str, message: str
) -> None:
    path = tmp_path / "site.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as caught:
        load_table(path, label)
    assert "\n" not in str(caught.value)


def test_identifier_columns_are_refused_not_one_hot_encoded(tmp_path: Path) -> None:
    frame = pd.DataFrame({"patient": [f"p{i}" for i in range(60)], "death": [0, 1] * 30})
    with pytest.raises(DataError, match="'patient' has 60 distinct text values"):
        load_table(_write(tmp_path / "ids.csv", frame), "death")


def test_unsupported_suffix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "site.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"must be \.csv or \.parquet"):
        load_table(path, "death")
