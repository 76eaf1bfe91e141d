"""What a sweep found: the configuration chosen per epsilon and arm, on validation scores
only (their mean over the validation seeds), and the chosen ones' test scores over seeds
(mean and 95% t-interval).

The choice is made from `ValidationScore`s, which carry validation scores and nothing
else: the code that chooses cannot see a test score (stage-1 runs compute none).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

from simulations.sweep_plan import ARMS, CONSTANT_LOSS_COLUMN, Config, Row, SweepDefinition

ARM_LABELS = {"federated": "federated", "central_dp": "central DP", "site_alone": "site alone"}


@dataclass(frozen=True)
class ValidationScore:
    """A configuration's stage-1 validation score for each arm (None: not scored, e.g. no
    baselines)."""

    epsilon: float
    config: Config
    scores: Mapping[str, float | None]
    higher_is_better: bool


def validation_scores(rows: Sequence[Row], definition: SweepDefinition) -> list[ValidationScore]:
    """The stage-1 rows' validation columns, and only those: one score per epsilon and
    configuration, each arm's the mean over the validation seeds (None if a seed did not
    score it, as a run that diverged)."""
    runs: dict[tuple[float, Config], list[Row]] = {}
    for row in rows:
        if row["stage"] == "1":
            config = tuple((key, row[key]) for key in definition.keys)
            runs.setdefault((float(row["epsilon"]), config), []).append(row)
    return [
        ValidationScore(
            epsilon,
            config,
            {arm: _mean_or_none([_number(r[f"validation_{arm}"]) for r in seeds]) for arm in ARMS},
            seeds[0]["better"] != "lower",
        )
        for (epsilon, config), seeds in runs.items()
    ]


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    if any(value is None for value in values):
        return None
    return sum(value for value in values if value is not None) / len(values)


def choose(scores: Sequence[ValidationScore]) -> dict[float, dict[str, Config]]:
    """For each epsilon and arm, the configuration with the best validation score.

    Ties (a baseline does not read the aggregator, so configurations that differ only
    there score it the same) go to the federated choice, else to the earlier grid point,
    so that stage 2 reruns as few configurations as it can.
    """
    chosen: dict[float, dict[str, Config]] = {}
    for epsilon in dict.fromkeys(score.epsilon for score in scores):
        at = [score for score in scores if score.epsilon == epsilon]
        picks: dict[str, Config] = {}
        for arm in ARMS:
            scored = [score for score in at if score.scores[arm] is not None]
            if not scored:
                continue
            best = max(_signed(score, arm) for score in scored)
            tied = [score.config for score in scored if _signed(score, arm) == best]
            preferred = picks.get("federated")
            picks[arm] = preferred if preferred in tied else tied[0]
        chosen[epsilon] = picks
    return chosen


def _signed(score: ValidationScore, arm: str) -> float:
    value = score.scores[arm]
    assert value is not None
    return value if score.higher_is_better else -value


@dataclass(frozen=True)
class ArmResult:
    """An arm's chosen configuration at one epsilon and its test scores over seeds."""

    epsilon: float
    arm: str
    config: Config
    validation: float | None
    test_scores: tuple[float, ...]
    test_losses: tuple[float, ...] = ()  # the log-loss beside the metric (none: not kept)

    @property
    def mean(self) -> float | None:
        return _average(self.test_scores)

    @property
    def mean_loss(self) -> float | None:
        return _average(self.test_losses)

    @property
    def half_width(self) -> float | None:
        """Half the 95% t-interval of the mean (Student's t, n - 1 degrees of freedom)."""
        n = len(self.test_scores)
        if n < 2:
            return None
        mean = sum(self.test_scores) / n
        deviation = math.sqrt(sum((x - mean) ** 2 for x in self.test_scores) / (n - 1))
        return float(stats.t.ppf(0.975, n - 1)) * deviation / math.sqrt(n)


@dataclass(frozen=True)
class SweepOutcome:
    """What a finished sweep found, and which metric it measured."""

    results: list[ArmResult]
    metric: str
    constant_loss: float | None  # no model's test log-loss: the bar for the probabilities


def arm_results(
    rows: Sequence[Row],
    definition: SweepDefinition,
    chosen: Mapping[float, Mapping[str, Config]],
) -> list[ArmResult]:
    """Each epsilon's and arm's stage-2 test scores at its chosen configuration."""
    validation = {
        (score.epsilon, score.config): score.scores for score in validation_scores(rows, definition)
    }
    results = []
    for epsilon, picks in chosen.items():
        for arm, config in picks.items():
            runs = [
                row
                for row in rows
                if row["stage"] == "2"
                and float(row["epsilon"]) == epsilon
                and tuple((key, row[key]) for key in definition.keys) == config
            ]
            scores = validation.get((epsilon, config), {})
            results.append(
                ArmResult(
                    epsilon,
                    arm,
                    config,
                    scores.get(arm),
                    _present(row[f"test_{arm}"] for row in runs),
                    # a sweep from before the loss column has none
                    _present(row.get(f"test_loss_{arm}") or "" for row in runs),
                )
            )
    return results


def constant_loss(rows: Sequence[Row]) -> float | None:
    """The constant prediction's test log-loss (no model), averaged over stage 2's runs;
    None for a sweep from before the column."""
    return _average(
        _present(row.get(CONSTANT_LOSS_COLUMN) or "" for row in rows if row["stage"] == "2")
    )


def _present(cells: Iterable[str]) -> tuple[float, ...]:
    return tuple(value for cell in cells if (value := _number(cell)) is not None)


def _average(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _number(text: str) -> float | None:
    if not text:
        return None
    value = float(text)
    return value if math.isfinite(value) else None
