"""The rows a deployed node trains and evaluates on: its own file, never sent anywhere.

A deployed node's SuperNode carries `data-path` and `label` in its node config (set by
`fedmodel client start`); the file never leaves the node. Its rows are split once, with
a fixed seed, into training rows and a held-out 20% on which the node scores the global
model (federated evaluation: the server has no test set). The encoding (means,
deviations, category vocabularies) is the federation's, sent by the server after the
query round, so every node produces the same feature columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch.utils.data import Dataset

from fedmodel.config import RunConfig
from fedmodel.data import TabularData
from fedmodel.evaluation import evaluate
from fedmodel.feature_statistics import FeatureStatistics
from fedmodel.local_tables import load_table, table_statistics
from fedmodel.protocol import (
    ARRAYS_KEY,
    CLIENT_INDEX_KEY,
    CONFIG_KEY,
    DATA_PATH_KEY,
    LABEL_KEY,
    METRICS_KEY,
    NODE_NAME_KEY,
    NUM_EXAMPLES_KEY,
    STATISTICS_KEY,
    STATISTICS_RECORD_KEY,
)
from fedmodel.table_task import table_task
from fedmodel.task import Task

HOLDOUT_FRACTION = 0.2
Metrics = dict[str, int | float | list[int] | list[float]]  # a MetricRecord's content
HOLDOUT_SEED = 20_240_401  # fixed: the held-out rows must not move between rounds


def is_deployed(context: Context) -> bool:
    return DATA_PATH_KEY in context.node_config


@dataclass(frozen=True)
class ClientRows:
    """What a node trains on in a round: its client index, its rows, and the task (model,
    per-sample loss) those rows train."""

    index: int
    data: Dataset
    task: Task


def local_training_rows(context: Context, msg: Message) -> ClientRows:
    """The client index the server gave this node and the training rows of its file.

    A simulated client's rows come from the harness instead (simulations/apps.py).
    """
    shared = msg.content.config_records[CONFIG_KEY]
    indices = json.loads(str(shared[CLIENT_INDEX_KEY]))
    train, _ = _split_node_table(context, str(shared[STATISTICS_KEY]))
    config = RunConfig.from_run_config(context.run_config)
    task = table_task(config, train.num_features, train.num_classes)
    return ClientRows(int(indices[str(context.node_id)]), train.dataset(), task)


def describe_local_data(msg: Message, context: Context) -> Message:
    """Query handler: this node's FeatureStatistics and name, for the federation's encoding."""
    path, label = _data_file(context)
    statistics = table_statistics(path, label)
    answer = ConfigRecord(
        {
            STATISTICS_KEY: statistics.to_json(),
            NODE_NAME_KEY: str(context.node_config.get(NODE_NAME_KEY, "")),
        }
    )
    return Message(RecordDict({STATISTICS_RECORD_KEY: answer}), reply_to=msg)


def evaluate_local_data(msg: Message, context: Context) -> Message:
    """Evaluate handler: score the global model on this node's held-out rows."""
    state = msg.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    record = MetricRecord(holdout_metrics(msg, context, state))
    return Message(RecordDict({METRICS_KEY: record}), reply_to=msg)


def holdout_metrics(msg: Message, context: Context, state: dict[str, torch.Tensor]) -> Metrics:
    """Loss, accuracy and AUROC of the model `state` on this node's held-out rows."""
    torch.set_num_threads(1)
    config = RunConfig.from_run_config(context.run_config)
    shared = msg.content.config_records[CONFIG_KEY]
    _, holdout = _split_node_table(context, str(shared[STATISTICS_KEY]))
    task = table_task(config, holdout.num_features, holdout.num_classes)
    model = task.model()
    model.load_state_dict(state)
    metrics = evaluate(model, holdout.dataset(), task.loss, task.metrics) if len(holdout) else {}
    auroc = metrics.get("auroc", float("nan"))
    return {
        NUM_EXAMPLES_KEY: len(holdout),
        "loss": metrics.get("loss", 0.0),
        "accuracy": metrics.get("accuracy", 0.0),
        # AUROC is undefined on a one-class holdout: report it with weight 0
        "auroc": auroc if np.isfinite(auroc) else 0.0,
        "auroc-weight": len(holdout) if np.isfinite(auroc) else 0,
    }


def _data_file(context: Context) -> tuple[str, str]:
    return str(context.node_config[DATA_PATH_KEY]), str(context.node_config.get(LABEL_KEY, ""))


def _split_node_table(context: Context, statistics: str) -> tuple[TabularData, TabularData]:
    path, label = _data_file(context)
    return _split(path, label, statistics)


@lru_cache(maxsize=2)
def _split(path: str, label: str, statistics: str) -> tuple[TabularData, TabularData]:
    data = load_table(path, label, FeatureStatistics.from_json(statistics))
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(data))
    held = int(len(data) * HOLDOUT_FRACTION)
    return data.subset(np.sort(order[held:])), data.subset(np.sort(order[:held]))
