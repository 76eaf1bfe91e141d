"""The built-in scenarios as Tasks: a registered model on a scenario's (or a user's) table.

`fedmodel simulate medical|financial|digits|csv` run the same machinery as a user's
`fedmodel simulate task MODULE:ATTR`: this module turns the scenario catalogue
(fedmodel/datasets/scenarios.py) into a `Task`, so no role has a path of its own for the
built-in data.
"""

from __future__ import annotations

from fedmodel.config import RunConfig
from fedmodel.datasets.scenarios import MIN_DP_ROWS, federation
from fedmodel.table_task import table_task
from fedmodel.task import Task


def tabular_task(config: RunConfig) -> Task:
    """The Task a built-in scenario (or `simulate csv`) names in `config`."""
    found = federation(config)
    notes: dict[str, object] = {
        "natural_sites": found.natural_sites,
        "too_small_to_train": list(found.too_small),
        "min_dp_rows": MIN_DP_ROWS,
        "achievable_auroc": found.achievable_auroc,
    }
    return table_task(
        config,
        found.test.num_features,
        found.test.num_classes,
        train_data=lambda site: found.clients[site.partition_id].dataset(),
        test_data=lambda seed: found.test.dataset(),
        num_sites=len(found.clients) if config.sites_from_data else None,
        site_names=found.site_names,
        table=found.schema,
        notes=notes,
    )
