"""Scenario registry: which table a (scenario, dataset) names and how clients split it."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from fedmodel.config import RunConfig
from fedmodel.data import TabularData, partition_indices
from fedmodel.errors import ConfigError
from simulations.medical import load_flchain

Loader = Callable[[], tuple[TabularData, TabularData]]

SCENARIOS: dict[str, dict[str, Loader]] = {
    "medical": {"flchain": load_flchain},
}


def scenario_loader(scenario: str, dataset: str) -> Loader:
    if scenario not in SCENARIOS:
        raise ConfigError(
            f"unknown scenario '{scenario}'; choose one of: {', '.join(sorted(SCENARIOS))}"
        )
    datasets = SCENARIOS[scenario]
    if dataset not in datasets:
        raise ConfigError(
            f"unknown {scenario} dataset '{dataset}'; choose one of: {', '.join(sorted(datasets))}"
        )
    return datasets[dataset]


@lru_cache(maxsize=4)
def load_scenario(scenario: str, dataset: str) -> tuple[TabularData, TabularData]:
    """(train, test) of a scenario; cached because every simulated client asks for it."""
    return scenario_loader(scenario, dataset)()


@lru_cache(maxsize=4)
def _partitions(
    scenario: str, dataset: str, clients: int, scheme: str, alpha: float, seed: int
) -> tuple[TabularData, ...]:
    train, _ = load_scenario(scenario, dataset)
    indices = partition_indices(train.labels, clients, scheme, alpha, seed)
    return tuple(train.subset(rows) for rows in indices)


def client_partitions(config: RunConfig) -> tuple[TabularData, ...]:
    """Every client's training rows under `config`'s partitioning (deterministic in seed)."""
    return _partitions(
        config.scenario,
        config.dataset,
        config.clients,
        config.partition,
        config.alpha,
        config.seed,
    )


def global_test_set(config: RunConfig) -> TabularData:
    """The fixed, held-out global test set the server evaluates on."""
    return load_scenario(config.scenario, config.dataset)[1]
