"""The rows a deployed node trains and evaluates on: its own file, never sent anywhere.

A deployed node's SuperNode carries `data-path` and `label` in its node config (set by
`fedmodel client start`); the file never leaves the node. Its rows are split once, with
a fixed seed, into training rows and a held-out 20% on which the node scores the global
model (federated evaluation: the server has no test set). The encoding (means,
deviations, category vocabularies) is the federation's, sent by the server after the
query round, so every node produces the same feature columns.

A run of an installed user task (`app-task` other than the built-in tabular one, already
approved by the owner: client/policy.py) reads the node's rows with the task's own
`local_data(data-path)` instead, and its query round describes nothing but the node's
name: such a task's encoding is its own code's, not the federation's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch.utils.data import Dataset, Subset

from fedmodel.config import TABULAR_TASK, RunConfig
from fedmodel.data import TabularData, row_count
from fedmodel.errors import TaskError
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
from fedmodel.task_loading import installed_task_references, task_from_reference

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
    return node_training_rows(context, msg.content.config_records[CONFIG_KEY])


def node_training_rows(context: Context, shared: Mapping[str, Any]) -> ClientRows:
    """`local_training_rows` from the run's shared config (client numbers, encoding):
    a message's config record, or a legacy FitIns config (client/secagg_app.py)."""
    index = int(json.loads(str(shared[CLIENT_INDEX_KEY]))[str(context.node_id)])
    config = RunConfig.from_run_config(context.run_config)
    if config.app_task != TABULAR_TASK:
        task, train_rows, _ = _user_task_rows(config, _data_file(context)[0])
        return ClientRows(index, train_rows, task)
    train, _ = _split_node_table(context, str(shared[STATISTICS_KEY]))
    task = table_task(config, train.num_features, train.num_classes)
    return ClientRows(index, train.dataset(), task)


def installed_user_task(config: RunConfig) -> Task:
    """The installed task the run names (`app-task`), never a module the coordinator
    names: only the `fedmodel.tasks` entry points of this machine are looked up."""
    if config.app_task not in installed_task_references():
        raise TaskError(f"no task named '{config.app_task}' is installed on this node")
    return task_from_reference(config.app_task, config)


def describe_local_data(msg: Message, context: Context) -> Message:
    """Query handler: this node's name and, for the tabular task, its FeatureStatistics
    (for the federation's encoding); a user task's node describes nothing of its rows."""
    answer = ConfigRecord({NODE_NAME_KEY: str(context.node_config.get(NODE_NAME_KEY, ""))})
    if RunConfig.from_run_config(context.run_config).app_task == TABULAR_TASK:
        path, label = _data_file(context)
        answer[STATISTICS_KEY] = table_statistics(path, label).to_json()
    return Message(RecordDict({STATISTICS_RECORD_KEY: answer}), reply_to=msg)


def evaluate_local_data(msg: Message, context: Context) -> Message:
    """Evaluate handler: score the global model on this node's held-out rows."""
    state = msg.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    record = MetricRecord(holdout_metrics(msg.content.config_records[CONFIG_KEY], context, state))
    return Message(RecordDict({METRICS_KEY: record}), reply_to=msg)


def holdout_metrics(
    shared: Mapping[str, Any], context: Context, state: dict[str, torch.Tensor]
) -> Metrics:
    """Loss, accuracy and AUROC of the model `state` on this node's held-out rows
    (`shared`: the run's shared config, which carries the tabular task's encoding).

    A task without accuracy (regression, or the user's own metrics) reports none; one
    without AUROC reports it with weight 0, as a one-class hold-out does
    (server/reply_schema.py).
    """
    torch.set_num_threads(1)
    config = RunConfig.from_run_config(context.run_config)
    holdout: Dataset
    if config.app_task != TABULAR_TASK:
        task, _, holdout = _user_task_rows(config, _data_file(context)[0])
    else:
        _, table = _split_node_table(context, str(shared[STATISTICS_KEY]))
        task, holdout = table_task(config, table.num_features, table.num_classes), table.dataset()
    model = task.model()
    model.load_state_dict(state)
    rows = row_count(holdout)
    metrics = evaluate(model, holdout, task.loss, task.metrics) if rows else {}
    auroc = metrics.get("auroc", float("nan"))
    scores: Metrics = {
        NUM_EXAMPLES_KEY: rows,
        "loss": metrics.get("loss", 0.0),
        # AUROC is undefined on a one-class holdout: report it with weight 0
        "auroc": auroc if np.isfinite(auroc) else 0.0,
        "auroc-weight": rows if np.isfinite(auroc) else 0,
    }
    if "accuracy" in task.metric_names:
        scores["accuracy"] = metrics.get("accuracy", 0.0)
    return scores


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


@lru_cache(maxsize=2)
def _user_task_rows(config: RunConfig, path: str) -> tuple[Task, Subset, Subset]:
    """The run's user task and its rows of the node's file: training rows and the
    held-out 20% (read once per run, not once per message)."""
    task = installed_user_task(config)
    if task.local_data is None:
        raise TaskError(
            f"task '{task.name}' has no local_data, so it cannot run on a deployed node; "
            "give its Task a local_data(path) that reads the node's file"
        )
    data = task.local_data(Path(path))
    rows = row_count(data)
    order = np.random.default_rng(HOLDOUT_SEED).permutation(rows)
    held = int(rows * HOLDOUT_FRACTION)
    train, holdout = np.sort(order[held:]).tolist(), np.sort(order[:held]).tolist()
    return task, Subset(data, train), Subset(data, holdout)
