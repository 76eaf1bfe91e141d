"""Scenario registry: which data a (scenario, dataset) names and how it becomes clients.

Three kinds of federation, one interface (`federation(config)`):

- a real table split by its natural site column (covid clinics, US states as banks, a
  user's `--partition-by` column): the data fixes the number of clients;
- a real table split into `--clients` parts (iid or dirichlet over the label);
- a generated federation (synthetic-ehr, synthetic-fraud): site `i` is built from its own
  seed only when asked for, so 1,000 sites cost nothing until a client trains.

Sites with fewer than `MIN_DP_ROWS` training rows are too small to train under DP and
are left out of the federation (and reported): with a few records, every Poisson batch
is nearly empty and the clipped-and-noised gradient is almost pure noise. The same floor
holds for a table split into `--clients` parts: a split that would make a client smaller
is refused (dirichlet draws again until every client has the floor, as flwr-datasets'
`min_partition_size` does), since a client cannot sit out of a split it was made for.
The ClientApp and ServerApp call `client_partitions` and `global_test_set`.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedmodel.config import CSV_SCENARIO, RunConfig
from fedmodel.config.keys import Task
from fedmodel.data import TabularData, partition_indices
from fedmodel.datasets.digits import load_mnist_5k
from fedmodel.datasets.financial import load_credit_default, load_lending_club
from fedmodel.datasets.medical import load_breast_cancer, load_covid_clinics, load_flchain_split
from fedmodel.datasets.synthetic import EhrGenerator, FraudGenerator, SiteGenerator
from fedmodel.datasets.tables import Split
from fedmodel.errors import ConfigError, DataError
from fedmodel.lazy_sequence import LazySequence
from fedmodel.table_schema import TableSchema

MIN_DP_ROWS = 20


TableLoader = Callable[[], Split]
GeneratorFactory = Callable[[int], SiteGenerator]

TABLES: dict[str, dict[str, TableLoader]] = {
    "medical": {
        "flchain": load_flchain_split,
        "covid-clinics": load_covid_clinics,
        "breast-cancer": load_breast_cancer,
    },
    "financial": {
        "lending-club": load_lending_club,
        "credit-default": load_credit_default,
    },
    "digits": {"mnist-5k": load_mnist_5k},
}
GENERATED: dict[str, dict[str, GeneratorFactory]] = {
    "medical": {"synthetic-ehr": EhrGenerator},
    "financial": {"synthetic-fraud": FraudGenerator},
}


def datasets_of(scenario: str) -> list[str]:
    """Every dataset name a scenario accepts, tables first."""
    return [*TABLES.get(scenario, {}), *GENERATED.get(scenario, {})]


@dataclass(frozen=True)
class Federation:
    """The clients' training sets, the server's test set, and what was left out and why."""

    clients: Sequence[TabularData]
    test: TabularData
    natural_sites: int | None = None  # distinct site ids in the table; None: not natural
    too_small: tuple[str, ...] = ()  # sites with fewer than MIN_DP_ROWS training rows
    site_names: tuple[str, ...] = ()
    achievable_auroc: float | None = None  # known only for generated data
    schema: TableSchema | None = None  # how a raw row becomes a model input


def federation(config: RunConfig) -> Federation:
    """The federation `config` describes (cached: every simulated client asks for it)."""
    return _federation(
        config.scenario,
        config.dataset,
        0 if config.sites_from_data else config.clients,  # the data fixes it
        config.partition,
        config.alpha,
        config.seed,
        config.data,
        config.label,
        config.partition_by,
        config.task,
    )


def client_partitions(config: RunConfig) -> Sequence[TabularData]:
    """Every client's training rows, indexed by Flower partition id (deterministic)."""
    return federation(config).clients


def global_test_set(config: RunConfig) -> TabularData:
    """The fixed, held-out global test set the server evaluates on."""
    return federation(config).test


@lru_cache(maxsize=4)
def _federation(
    scenario: str,
    dataset: str,
    clients: int,
    scheme: str,
    alpha: float,
    seed: int,
    data: str,
    label: str,
    partition_by: str,
    task: Task,
) -> Federation:
    if scenario == CSV_SCENARIO:
        from fedmodel.datasets.csv_scenario import load_csv_split

        split = load_csv_split(data, label, partition_by or None, task)
        try:
            return _table_federation(split, clients, scheme, alpha, seed)
        except DataError as error:  # the user's file: a bad input, exit code 2
            raise ConfigError(str(error)) from None
    if dataset in GENERATED.get(scenario, {}):
        generator = GENERATED[scenario][dataset](seed)
        return Federation(
            LazySequence(clients, generator.train_site),  # milliseconds per site: built on use
            generator.test_set(clients),
            achievable_auroc=getattr(generator, "achievable_auroc", None),
            schema=TableSchema("label", raw_columns=generator.feature_names),
        )
    split = _load_table(scenario, dataset)
    return _table_federation(split, clients, scheme, alpha, seed)


def scenario_loader(scenario: str, dataset: str) -> TableLoader | GeneratorFactory:
    """The loader (real table) or generator factory a (scenario, dataset) names."""
    if scenario not in TABLES:
        raise ConfigError(
            f"unknown scenario '{scenario}'; choose one of: {', '.join(sorted(TABLES))}"
        )
    if dataset not in datasets_of(scenario):
        raise ConfigError(
            f"unknown {scenario} dataset '{dataset}'; "
            f"choose one of: {', '.join(datasets_of(scenario))}"
        )
    if dataset in TABLES[scenario]:
        return TABLES[scenario][dataset]
    return GENERATED[scenario][dataset]


@lru_cache(maxsize=4)
def _load_table(scenario: str, dataset: str) -> Split:
    scenario_loader(scenario, dataset)  # validates both names
    return TABLES[scenario][dataset]()


def _table_federation(
    split: Split, clients: int, scheme: str, alpha: float, seed: int
) -> Federation:
    if split.train_sites is None:
        total = len(split.train)
        if total < clients * MIN_DP_ROWS:
            raise DataError(
                f"{total} training rows cannot make {clients} clients of at least {MIN_DP_ROWS} "
                f"rows, the least DP-SGD can use; use --clients {max(1, total // MIN_DP_ROWS)} "
                "or fewer"
            )
        indices = partition_indices(
            split.train.labels, clients, scheme, alpha, seed, min_rows=MIN_DP_ROWS
        )
        small = [str(client) for client, part in enumerate(indices) if len(part) < MIN_DP_ROWS]
        if small:
            raise DataError(
                f"{scheme} partitioning left client(s) {', '.join(small)} with fewer than "
                f"{MIN_DP_ROWS} training rows, the least DP-SGD can use; use fewer --clients"
                + (" or a larger --alpha" if scheme == "dirichlet" else "")
            )
        return Federation(
            tuple(split.train.subset(rows) for rows in indices), split.test, schema=split.schema
        )
    by_site = natural_partitions(split.train_sites)
    kept = {name: rows for name, rows in by_site.items() if len(rows) >= MIN_DP_ROWS}
    if not kept:
        raise DataError(
            f"no site has at least {MIN_DP_ROWS} training rows, the least DP-SGD can use; "
            "partition by a coarser column"
        )
    return Federation(
        tuple(split.train.subset(rows) for rows in kept.values()),
        split.test,
        natural_sites=len(split.site_names),
        too_small=tuple(name for name in split.site_names if name not in kept),
        site_names=tuple(kept),
        schema=split.schema,
    )


def natural_partitions(site_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices per natural site id (sorted by id), via flwr-datasets' NaturalIdPartitioner."""
    from datasets import Dataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by="site")
    partitioner.dataset = Dataset.from_dict(
        {"row": np.arange(len(site_ids)), "site": [str(s) for s in site_ids]}
    )
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar is not our output
        rows = [
            np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
            for i in range(partitioner.num_partitions)
        ]
    names = partitioner.partition_id_to_natural_id
    return {str(names[i]): part for i, part in enumerate(rows)}
