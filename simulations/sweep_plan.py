"""A sweep's plan: its definition (grid, epsilons, seeds), and the runs of each stage.

Stage 1: every grid point at every epsilon, at the first seed (or the first
`validation_seeds` seeds), scored on validation rows.
Stage 2: the configurations chosen at each epsilon (simulations/sweep_results.py), every
seed, scored on the test set. A run's key is a hash of everything that decides its
result, so a resumed sweep recognises the runs it has finished.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ARMS = ("federated", "central_dp", "site_alone")
CONSTANT_LOSS_COLUMN = "test_loss_constant"  # sweep.csv: no model's test loss (stage 2)

Config = tuple[tuple[str, str], ...]
"""One grid point: (option name, value as typed) for each grid key, in the grid's order."""
Row = dict[str, str]


@dataclass(frozen=True)
class SweepDefinition:
    """What a sweep runs; equal definitions are the same sweep (and may resume)."""

    scenario: str
    epsilons: tuple[float, ...]
    seeds: tuple[int, ...]
    grid: tuple[tuple[str, tuple[str, ...]], ...]  # (simulate option name, its values)
    passthrough: tuple[str, ...]  # other simulate options, given to every run
    validation_fraction: float
    metric: str = ""  # what chooses and is reported; empty: the scenario's headline
    validation_seeds: int = 1  # stage 1's seeds, from the first: the choice reads their mean

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.grid)

    def configs(self) -> list[Config]:
        """Every grid point, in the grid's order."""
        values = itertools.product(*(choices for _, choices in self.grid))
        return [tuple(zip(self.keys, point, strict=True)) for point in values]

    @property
    def stage_one_seeds(self) -> tuple[int, ...]:
        first = self.seeds[0]
        return tuple(range(first, first + self.validation_seeds))

    def to_json(self) -> dict[str, object]:
        stored = json.loads(json.dumps(asdict(self)))  # tuples as lists, as the file holds them
        # as sweeps before --metric and --validation-seeds stored it, so that they resume
        if not self.metric:
            del stored["metric"]
        if self.validation_seeds == 1:
            del stored["validation_seeds"]
        return stored


@dataclass(frozen=True)
class PlannedRun:
    """One `fedmodel simulate` run of a sweep."""

    stage: int  # 1: scored on validation rows; 2: on the test set
    epsilon: float
    seed: int
    config: Config

    def key(self, definition: SweepDefinition) -> str:
        """The run's identity: a hash of everything that decides its result."""
        what: list[object] = [definition.scenario, definition.passthrough, asdict(self)]
        if self.stage == 1:
            what.append(definition.validation_fraction)
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]

    def arguments(self, definition: SweepDefinition, run_dir: Path) -> list[str]:
        """`fedmodel simulate`'s arguments for this run."""
        options = [f"--{name}={value}" for name, value in self.config]
        if self.stage == 1:
            options.append(f"--validation-fraction={definition.validation_fraction:g}")
        return [
            "simulate",
            definition.scenario,
            *definition.passthrough,
            *options,
            f"--epsilon={self.epsilon:g}",
            f"--seed={self.seed}",
            f"--output={run_dir}",
        ]

    def described(self) -> str:
        return described(self.config)


def described(config: Config) -> str:
    """`lr=0.1 aggregator=fedavg`, or `defaults` for the empty grid."""
    return " ".join(f"{name}={value}" for name, value in config) or "defaults"


def stage_one(definition: SweepDefinition) -> list[PlannedRun]:
    """Every grid point at every epsilon, at each validation seed."""
    return [
        PlannedRun(1, epsilon, seed, config)
        for epsilon in definition.epsilons
        for config in definition.configs()
        for seed in definition.stage_one_seeds
    ]


def stage_two(
    definition: SweepDefinition, chosen: Mapping[float, Sequence[Config]]
) -> list[PlannedRun]:
    """The chosen configurations of each epsilon (one per arm, shared when equal), every seed."""
    return [
        PlannedRun(2, epsilon, seed, config)
        for epsilon in definition.epsilons
        for config in dict.fromkeys(chosen[epsilon])
        for seed in definition.seeds
    ]
