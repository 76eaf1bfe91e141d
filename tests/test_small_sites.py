"""Small sites: a per-client batch of at most a quarter of the rows, and the 20-row floor
for every partition, with the privacy accounting still exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmodel.config import RunConfig
from fedmodel.datasets.scenarios import MIN_DP_ROWS, federation
from fedmodel.errors import DataError
from fedmodel.sampling import client_batch_size, poisson_plan
from tests.conftest import assert_epsilons_recompute
from tests.test_sweep import fedmodel  # this checkout's CLI, as a user runs it


def wine_like_table(sites: int = 4, rows_per_site: int = 56, seed: int = 0) -> pd.DataFrame:
    """Like scikit-learn's wine table, class 0 against the rest: 13 numbers, a few dozen
    rows per site (about 45 of them training rows after the 20% test split)."""
    rng = np.random.default_rng(seed)
    rows = sites * rows_per_site
    label = rng.random(rows) < 0.33
    features = rng.normal(size=(rows, 13)) + 1.2 * label[:, None] * rng.normal(size=13)
    table = pd.DataFrame(features, columns=[f"x{i}" for i in range(13)])
    table["site"] = np.repeat([f"site-{i}" for i in range(sites)], rows_per_site)
    table["class0"] = label.astype(int)
    return table


@pytest.mark.parametrize(
    ("rows", "requested", "expected"), [(45, 64, 11), (3, 64, 1), (256, 64, 64), (255, 64, 63)]
)
def test_a_client_with_fewer_than_four_batches_takes_a_quarter_of_its_rows(
    rows: int, requested: int, expected: int
) -> None:
    batch = client_batch_size(rows, requested)
    assert batch == expected
    plan = poisson_plan(rows, batch)
    assert plan.steps_per_epoch >= min(4, rows) and rows * plan.sample_rate <= max(rows / 4, 1)


@pytest.mark.slow  # two CLI processes: ~35 s
def test_small_sites_train_with_a_quarter_batch_and_their_ledgers_verify(tmp_path: Path) -> None:
    data = tmp_path / "wine.csv"
    wine_like_table().to_csv(data, index=False)
    run_dir = tmp_path / "run"
    ran = fedmodel(
        *("simulate", "csv", "--data", str(data), "--label", "class0", "--partition-by", "site"),
        *("--batch-size", "64", "--rounds", "1", "--model", "logreg", "--no-baselines"),
        *("--output", str(run_dir)),
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "4 clients hold fewer than 4 batches of --batch-size 64" in ran.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["clients"]) == 4
    for client in summary["clients"]:
        rows = client["num_examples"]
        assert 35 <= rows <= 55
        ((_, rate, steps),) = client["history"]
        assert rows * rate <= rows / 4  # the expected batch: at most a quarter of the rows
        assert steps >= 4
        assert f"({rows} rows) {rows // 4}" in ran.stdout
    assert_epsilons_recompute(summary)
    audit = fedmodel("audit", str(run_dir), "--json", cwd=tmp_path)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_an_iid_split_below_the_floor_is_refused_in_one_line() -> None:
    config = RunConfig(dataset="breast-cancer", clients=24)  # 455 training rows: ~18 each
    with pytest.raises(DataError, match=r"use --clients 22 or fewer"):
        federation(config)
    parts = federation(config.replace(clients=22)).clients
    assert min(len(part) for part in parts) >= MIN_DP_ROWS


def test_a_dirichlet_split_gives_every_client_the_floor_or_says_what_to_change() -> None:
    config = RunConfig(dataset="breast-cancer", clients=8, partition="dirichlet", alpha=0.5)
    assert min(len(part) for part in federation(config).clients) == MIN_DP_ROWS
    with pytest.raises(DataError, match=r"use fewer --clients or a larger --alpha"):
        federation(config.replace(clients=10, alpha=0.3))
