"""The schema of what a node may report: metrics of train and evaluate replies.

A node's metrics are input from an untrusted party. Each field is read here, once,
against its type (a scalar number, or a list where the protocol sends one), its range
and finiteness; anything else raises `InvalidReply` with the reason, which the
strategy records as a rejection. Nothing a node sends can then raise elsewhere in the
ServerApp (in Flower's rules, the run record or the summary's JSON).

Fields the owner's release policy may round or withhold (client/executor.py
`released`: example counts rounded, the training loss withheld, evaluation not
released) are optional: a withheld field is read as None, never as a rejection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedmodel.privacy.accountant import Segment
from fedmodel.protocol import (
    BUDGET_KEYS,
    DELTA_KEY,
    EPSILON_KEY,
    EVALUATION_PREFIX,
    HISTORY_KEYS,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    TRAIN_LOSS_KEY,
)

# Rows one node may claim (a billion); more is a lie, not a hospital
MAX_COUNT = 10**9
# Client numbers a run hands out; partition ids beyond are not ours
MAX_PARTITION_ID = 2**31 - 1
# Mechanism segments one history may hold (one per round a dataset ever trained)
MAX_HISTORY = 100_000
EVALUATION_KEYS = (NUM_EXAMPLES_KEY, "loss", "auroc", "auroc-weight")
# Reported by a classifier's node only: a regression or user-metric task has no accuracy
OPTIONAL_EVALUATION_KEYS = ("accuracy",)

Metrics = Mapping[str, object]


class InvalidReply(ValueError):
    """A reply that breaks the schema; its message is the reason recorded for it."""


@dataclass(frozen=True)
class ReleasedBudget:
    """The owner's budget as its node states it: what the operator is shown of it.

    The node enforces its budget; the coordinator cannot check these numbers (it never
    sees the owner's ledger) and acts on none of them.
    """

    epsilon: float
    delta: float
    left: float


@dataclass(frozen=True)
class TrainReport:
    """A training reply's metrics as validated; None where the owner withheld a field."""

    partition_id: int
    num_examples: int | None
    train_loss: float | None
    epsilon: float | None  # None: the run trains without DP-SGD
    delta: float | None
    history: tuple[Segment, ...]
    budget: ReleasedBudget | None = None  # None: not released (or no DP-SGD)


@dataclass(frozen=True)
class EvaluationReport:
    """A node's score of a global model on its held-out rows.

    `auroc_weight` is the number of held-out rows AUROC was computed on (0 where it is
    undefined: a one-class hold-out, or a task that is not a classifier), never more than
    `num_examples`. `accuracy` is None for a task that has none (regression).
    """

    num_examples: int
    loss: float
    accuracy: float | None
    auroc: float
    auroc_weight: int


def train_report(metrics: Metrics, sample_dp: bool) -> TrainReport:
    """Read a train reply's metrics; `sample_dp` runs require epsilon, delta and history."""
    report = TrainReport(
        partition_id=_count(metrics, PARTITION_ID_KEY, 0, MAX_PARTITION_ID),
        num_examples=_count(metrics, NUM_EXAMPLES_KEY) if NUM_EXAMPLES_KEY in metrics else None,
        train_loss=_number(metrics, TRAIN_LOSS_KEY) if TRAIN_LOSS_KEY in metrics else None,
        epsilon=None,
        delta=None,
        history=(),
    )
    if not sample_dp:
        return report
    delta = _number(metrics, DELTA_KEY, 0.0, 1.0)
    if delta in (0.0, 1.0):
        raise InvalidReply(f"'delta' must be strictly between 0 and 1, got {delta!r}")
    return TrainReport(
        partition_id=report.partition_id,
        num_examples=report.num_examples,
        train_loss=report.train_loss,
        epsilon=_number(metrics, EPSILON_KEY),
        delta=delta,
        history=_history(metrics),
        budget=_budget(metrics),
    )


def evaluation_report(metrics: Metrics, prefix: str = "") -> EvaluationReport | None:
    """Read an evaluation; None when the owner released none of it.

    `prefix` reads the evaluation riding on a deployed train reply (`eval-loss`, ...).
    Part of an evaluation is as invalid as a wrong one: the keys come all or none (but
    accuracy, which only a classifier's node reports).
    """
    present = [key for key in EVALUATION_KEYS if prefix + key in metrics]
    if not present and not any(prefix + key in metrics for key in OPTIONAL_EVALUATION_KEYS):
        return None
    if len(present) < len(EVALUATION_KEYS):
        missing = sorted(prefix + key for key in set(EVALUATION_KEYS) - set(present))
        raise InvalidReply(f"evaluation is incomplete: missing {missing}")
    examples = _count(metrics, prefix + NUM_EXAMPLES_KEY, 0)
    return EvaluationReport(
        num_examples=examples,
        loss=_number(metrics, prefix + "loss"),
        accuracy=(
            _number(metrics, prefix + "accuracy", 0.0, 1.0)
            if prefix + "accuracy" in metrics
            else None
        ),
        auroc=_number(metrics, prefix + "auroc", 0.0, 1.0),
        auroc_weight=_count(metrics, prefix + "auroc-weight", 0, examples),
    )


def riding_evaluation(metrics: Metrics) -> EvaluationReport | None:
    """The evaluation a deployed node's train reply carries (see EVALUATION_PREFIX)."""
    return evaluation_report(metrics, EVALUATION_PREFIX)


def _budget(metrics: Metrics) -> ReleasedBudget | None:
    """The budget a sample-DP reply states: all three keys or none (as an evaluation)."""
    present = [key for key in BUDGET_KEYS if key in metrics]
    if not present:
        return None
    if len(present) < len(BUDGET_KEYS):
        raise InvalidReply(
            f"budget is incomplete: missing {sorted(set(BUDGET_KEYS) - set(present))}"
        )
    epsilon_key, delta_key, left_key = BUDGET_KEYS
    epsilon = _number(metrics, epsilon_key)
    delta = _number(metrics, delta_key, 0.0, 1.0)
    if epsilon == 0.0 or delta in (0.0, 1.0):
        raise InvalidReply(f"'{epsilon_key}' must be positive and '{delta_key}' within (0, 1)")
    return ReleasedBudget(epsilon, delta, _number(metrics, left_key, 0.0, epsilon))


def _scalar(metrics: Metrics, key: str) -> float:
    if key not in metrics:
        raise InvalidReply(f"missing '{key}'")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidReply(f"'{key}' must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidReply(f"'{key}' must be finite, got {value!r}")
    return float(value)


def _number(metrics: Metrics, key: str, low: float = 0.0, high: float = math.inf) -> float:
    """A finite number in [low, high]."""
    value = _scalar(metrics, key)
    if not low <= value <= high:
        raise InvalidReply(f"'{key}' must be within [{low:g}, {high:g}], got {value!r}")
    return value


def _count(metrics: Metrics, key: str, low: int = 1, high: int = MAX_COUNT) -> int:
    """A whole number in [low, high] (a float that is whole is accepted)."""
    value = _scalar(metrics, key)
    if not value.is_integer() or not low <= value <= high:
        raise InvalidReply(f"'{key}' must be a whole number in [{low}, {high}], got {value!r}")
    return int(value)


def _history(metrics: Metrics) -> tuple[Segment, ...]:
    """Parallel lists (noise multiplier, sample rate, steps) of equal, bounded length."""
    columns: list[list[object]] = []
    for key in HISTORY_KEYS:
        if key not in metrics:
            raise InvalidReply(f"missing '{key}'")
        values = metrics[key]
        if not isinstance(values, list) or not 1 <= len(values) <= MAX_HISTORY:
            raise InvalidReply(f"'{key}' must be a list of 1 to {MAX_HISTORY} numbers")
        columns.append(values)
    lengths = [len(column) for column in columns]
    if len(set(lengths)) > 1:
        raise InvalidReply(
            f"history lists differ in length: {dict(zip(HISTORY_KEYS, lengths, strict=True))}"
        )
    segments = []
    for index, values in enumerate(zip(*columns, strict=True)):
        segment = {
            f"{key}[{index}]": value for key, value in zip(HISTORY_KEYS, values, strict=True)
        }
        noise, rate, steps = segment
        segments.append(
            (_number(segment, noise), _number(segment, rate, 0.0, 1.0), _count(segment, steps, 0))
        )
    return tuple(segments)
