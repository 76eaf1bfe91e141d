"""Run configuration: `RunConfig` (the keys, defaults and validation) and its key metadata."""

from fedmodel.config.keys import ConfigKey, Section
from fedmodel.config.run_config import (
    AGGREGATORS,
    CSV_SCENARIO,
    EVALUATION_METHODS,
    NATURAL_DATASETS,
    SECAGG_MAX_CLIENTS_PER_ROUND,
    TASK_SCENARIO,
    RunConfig,
)
from fedmodel.config.run_keys import TABULAR_TASK, TASK_ENTRY_POINTS

__all__ = [
    "AGGREGATORS",
    "CSV_SCENARIO",
    "EVALUATION_METHODS",
    "NATURAL_DATASETS",
    "SECAGG_MAX_CLIENTS_PER_ROUND",
    "TABULAR_TASK",
    "TASK_ENTRY_POINTS",
    "TASK_SCENARIO",
    "ConfigKey",
    "RunConfig",
    "Section",
]
