"""A node's reply is input from an untrusted party: every malformed one is a reason.

The schema (server/reply_schema.py), and the strategy built on it, are specified here
with forged replies; none of them may raise, and none may set another node's row or
weight.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedmodel.config import RunConfig
from fedmodel.errors import DataError
from fedmodel.feature_statistics import MAX_CATEGORIES, FeatureStatistics
from fedmodel.protocol import BUDGET_KEYS, PARTITION_ID_KEY
from fedmodel.run_directory import CLASSIFIER_SCORING
from server.federated_evaluation import combine_evaluations
from server.reply_schema import (
    EvaluationReport,
    InvalidReply,
    ReleasedBudget,
    evaluation_report,
    riding_evaluation,
    train_report,
)
from server.run_record import RunRecorder
from server.strategy import GuardedStrategy, Members

HONEST = {
    PARTITION_ID_KEY: 1,
    "num-examples": 100,
    "train-loss": 0.5,
    "epsilon": 0.8,
    "delta": 1e-5,
    "history-noise-multiplier": [1.1],
    "history-sample-rate": [0.01],
    "history-steps": [100],
    "budget-epsilon": 1.0,
    "budget-delta": 1e-5,
    "budget-left": 0.2,
}
EVALUATION = {"num-examples": 30, "loss": 0.4, "accuracy": 0.8, "auroc": 0.7, "auroc-weight": 30}

# (what the node sent instead of the honest metrics, a word of the recorded reason)
MALFORMED = [
    ({PARTITION_ID_KEY: None}, "missing 'partition-id'"),
    ({"epsilon": None}, "missing 'epsilon'"),
    ({"delta": None}, "missing 'delta'"),
    ({"history-steps": None}, "missing 'history-steps'"),
    ({PARTITION_ID_KEY: math.nan}, "'partition-id' must be finite"),
    ({PARTITION_ID_KEY: -1}, "'partition-id' must be a whole number"),
    ({PARTITION_ID_KEY: 1.5}, "'partition-id' must be a whole number"),
    ({"num-examples": math.inf}, "'num-examples' must be finite"),
    ({"num-examples": 0}, "'num-examples' must be a whole number in [1,"),
    ({"num-examples": 1e12}, "'num-examples' must be a whole number in [1,"),
    ({"num-examples": [100, 100]}, "'num-examples' must be a number, got list"),
    ({"train-loss": [0.5]}, "'train-loss' must be a number, got list"),
    ({"train-loss": -1.0}, "'train-loss' must be within"),
    ({"epsilon": math.nan}, "'epsilon' must be finite"),
    ({"epsilon": -0.1}, "'epsilon' must be within"),
    ({"delta": 1.0}, "'delta' must be strictly between 0 and 1"),
    ({"history-steps": 100}, "'history-steps' must be a list"),
    ({"history-steps": [100, 100]}, "history lists differ in length"),
    ({"history-sample-rate": [2.0]}, "'history-sample-rate[0]' must be within [0, 1]"),
    ({"history-noise-multiplier": [math.nan]}, "'history-noise-multiplier[0]' must be finite"),
    ({"history-steps": [1.5]}, "'history-steps[0]' must be a whole number"),
    ({"budget-left": None}, "budget is incomplete: missing ['budget-left']"),
    ({"budget-left": 1.5}, "'budget-left' must be within [0, 1]"),
    ({"budget-epsilon": 0.0}, "'budget-epsilon' must be positive"),
    ({"budget-delta": 1.0}, "'budget-delta' within (0, 1)"),
]


def forged(changes: dict[str, object], base: dict[str, object] = HONEST) -> dict[str, object]:
    """`base` with `changes`; a change to None removes the key."""
    metrics = {**base, **changes}
    return {key: value for key, value in metrics.items() if value is not None}


@pytest.mark.parametrize(("changes", "reason"), MALFORMED)
def test_each_malformed_train_reply_is_a_reason_not_an_exception(
    changes: dict[str, object], reason: str
) -> None:
    with pytest.raises(InvalidReply) as invalid:
        train_report(forged(changes), sample_dp=True)
    assert reason in str(invalid.value)


def test_fields_the_owner_may_withhold_are_read_as_withheld() -> None:
    report = train_report(forged({"num-examples": None, "train-loss": None}), sample_dp=True)
    assert report.num_examples is None and report.train_loss is None
    assert report.epsilon == 0.8 and report.history == ((1.1, 0.01, 100),)
    assert train_report(forged({"num-examples": 100.0}), sample_dp=True).num_examples == 100
    assert train_report(HONEST, sample_dp=True).budget == ReleasedBudget(1.0, 1e-5, 0.2)
    assert train_report(forged(dict.fromkeys(BUDGET_KEYS)), sample_dp=True).budget is None


def test_a_run_without_dp_sgd_asks_for_no_privacy_fields() -> None:
    report = train_report({PARTITION_ID_KEY: 0, "num-examples": 5}, sample_dp=False)
    assert report.epsilon is None and report.history == ()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"auroc-weight": 1e12}, "'eval-auroc-weight' must be a whole number in [0, 30]"),
        ({"auroc-weight": -5}, "'eval-auroc-weight' must be a whole number in [0, 30]"),
        ({"auroc": math.nan}, "'eval-auroc' must be finite"),
        ({"accuracy": 1.5}, "'eval-accuracy' must be within [0, 1]"),
        ({"loss": None}, "evaluation is incomplete: missing ['eval-loss']"),
        ({"num-examples": [30]}, "'eval-num-examples' must be a number, got list"),
    ],
)
def test_each_poisoned_evaluation_is_a_reason(changes: dict[str, object], reason: str) -> None:
    metrics = {"eval-" + key: value for key, value in forged(changes, EVALUATION).items()}
    with pytest.raises(InvalidReply) as invalid:
        riding_evaluation(metrics)
    assert reason in str(invalid.value)


def test_an_evaluation_the_owner_does_not_release_is_absent_not_invalid() -> None:
    assert riding_evaluation(HONEST) is None
    assert evaluation_report(EVALUATION) == EvaluationReport(30, 0.4, 0.8, 0.7, 30)


def test_capped_evaluation_weights_let_no_node_set_the_federations_auroc() -> None:
    honest = [EvaluationReport(30, 0.4, 0.8, 0.7, 30), EvaluationReport(30, 0.5, 0.7, 0.6, 30)]
    liar = EvaluationReport(10**9, 9.0, 0.0, 0.0, 10**9)  # a vast hold-out, all wrong
    scores = combine_evaluations([(report, 1) for report in [*honest, liar]])
    assert scores["auroc"] == pytest.approx((0.7 + 0.6 + 0.0) / 3)  # one vote each
    median = combine_evaluations([(report, 1) for report in [*honest, liar]], "median")
    assert median["auroc"] == 0.6 and median["loss"] == 0.5  # within the honest range
    capped = combine_evaluations([(honest[0], 40), (liar, 40)])  # operator-vouched rows
    assert capped["auroc"] == pytest.approx((0.7 * 30 + 0.0 * 40) / 70)
    no_curve = EvaluationReport(10, 0.3, 0.9, 0.0, 0)  # one-class hold-out: AUROC undefined
    assert combine_evaluations([(honest[0], 1), (no_curve, 1)])["auroc"] == 0.7


# --- the strategy: identity and weight are the coordinator's -----------------------------


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower refuses to build Messages outside a running app without an identity."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


GLOBAL = {"w": np.zeros(4, dtype=np.float32)}


def reply(node: int, metrics: dict[str, object], shift: float) -> Message:
    arrays = ArrayRecord({"w": torch.from_numpy(GLOBAL["w"] + np.float32(shift))})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=instruction)  # from `node`, as Flower says


def deployed_strategy(tmp_path: Path) -> GuardedStrategy:
    recorder = RunRecorder(
        tmp_path, RunConfig(scenario="deployment", clients=3), CLASSIFIER_SCORING
    )
    members = Members(clients={11: "0", 12: "1", 13: "2"}, weight_caps={11: 1, 12: 1, 13: 1})
    strategy = GuardedStrategy(FedAvg(), recorder, min_clients=2, members=members)
    strategy._global_arrays = ArrayRecord({"w": torch.from_numpy(GLOBAL["w"])})
    return strategy


def test_a_node_cannot_inflate_its_weight_or_take_another_nodes_row(tmp_path: Path) -> None:
    strategy = deployed_strategy(tmp_path)
    replies = [
        reply(11, forged({PARTITION_ID_KEY: 0}), 1.0),
        reply(12, forged({PARTITION_ID_KEY: 1, "num-examples": 10**8}), 100.0),  # inflated
        reply(13, forged({PARTITION_ID_KEY: 0, "epsilon": 0.0}), 5.0),  # spoofs client 0
        reply(13, forged({PARTITION_ID_KEY: 2, "epsilon": math.nan}), 5.0),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert arrays["w"].numpy() == pytest.approx(np.full(4, (1.0 + 100.0) / 2))  # uniform
    summary = strategy.recorder.write_summary(completed=True)
    assert [client["epsilon"] for client in summary.clients] == [0.8, 0.8]  # row 0 intact
    assert {client["weight"] for client in summary.clients} == {1}
    reasons = [rejection["reason"] for rejection in summary.rejected_updates]
    assert reasons == [
        "reports partition-id 0, but node 13 is client 2",
        "'epsilon' must be finite, got nan",
    ]
    json.dumps(summary.to_json(), allow_nan=False)


def test_a_node_outside_the_run_is_rejected(tmp_path: Path) -> None:
    strategy = deployed_strategy(tmp_path)
    replies = [reply(node, forged({PARTITION_ID_KEY: i}), 0.0) for i, node in enumerate((11, 12))]
    strategy.aggregate_train(1, [*replies, reply(99, forged({}), 0.0)])
    (rejection,) = strategy.recorder.rejections
    assert rejection["reason"] == "node 99 is not a member of this run"


# --- query-round statistics ---------------------------------------------------------------


def statistics(**changes: object) -> str:
    honest = {"numeric": {"age": [10, 500.0, 26000.0]}, "categories": {"sex": ["F", "M"]}}
    return json.dumps({**honest, "rows": 10, **changes})


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (statistics(categories={"id": [str(n) for n in range(10**4)]}), "10000 categories"),
        (statistics(numeric={"age": [11, 500.0, 26000.0]}), "counts 11 values in 10 rows"),
        (statistics(numeric={"age": [10, 1e300, 1e300]}), "beyond values of magnitude"),
        (statistics(numeric={"age": [10, 500.0, 1.0]}), "sum of squares no table can have"),
        (statistics(rows=0), "0 rows"),
    ],
)
def test_statistics_beyond_the_bounds_are_named(text: str, reason: str) -> None:
    violation = FeatureStatistics.from_json(text).bounds_violation()
    assert violation is not None and reason in violation


@pytest.mark.parametrize(
    "text",
    ['{"numeric": {"age": [1e999, 0, 0]}, "categories": {}, "rows": 1}', "[]", "{", '{"rows": 1}'],
)
def test_unreadable_statistics_are_a_data_error(text: str) -> None:
    with pytest.raises(DataError, match="malformed feature statistics"):
        FeatureStatistics.from_json(text)


def test_honest_statistics_are_within_the_bounds() -> None:
    assert FeatureStatistics.from_json(statistics()).bounds_violation() is None
    categories = {"c": [str(n) for n in range(MAX_CATEGORIES)]}
    assert FeatureStatistics.from_json(statistics(categories=categories)).bounds_violation() is None


def test_the_query_answer_must_be_statistics(tmp_path: Path) -> None:
    from server.deployment import _node_statistics

    answer = Message(RecordDict({"statistics": ConfigRecord({"x": 1})}), 1, "query")
    with pytest.raises(DataError, match="no ConfigRecord 'statistics'"):
        _node_statistics(answer, None)
    answer = Message(
        RecordDict({"statistics": ConfigRecord({"feature-statistics": statistics(rows=100)})}),
        1,
        "query",
    )
    with pytest.raises(DataError, match="above the 50 enrolled"):
        _node_statistics(answer, 50)
