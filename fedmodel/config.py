"""The one definition of every run-config key, its default and its validation.

The CLI builds a `RunConfig`, the simulation runner writes it into the Flower App's run
config (keys are the field names with `-` for `_`), and the ServerApp and ClientApp read
it back with `RunConfig.from_run_config`. pyproject.toml repeats the defaults because
Flower requires them there; a test keeps both equal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedmodel.errors import ConfigError

AGGREGATORS = ("fedavg", "fedadam", "median", "trimmed-mean", "krum", "multikrum", "bulyan")
ATTACKS = ("none", "sign-flip", "scaled", "gaussian", "nan")
PARTITION_SCHEMES = ("iid", "dirichlet", "shard", "pathological")
TASKS = ("binary", "multiclass")


@dataclass(frozen=True)
class RunConfig:
    """Resolved settings of one federated run (simulation or deployment)."""

    scenario: str = "medical"
    dataset: str = "flchain"
    clients: int = 8
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.5
    dp: bool = True
    epsilon: float = 1.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    model: str = "mlp"
    output_dir: str = "runs/flwr-run"
    # scenarios (issue 3)
    fraction: float = 1.0
    data: str = ""
    label: str = ""
    partition_by: str = ""
    task: str = "binary"  # simulate csv: how the label column is read
    # privacy budgets (issue 5)
    budget_epsilon: float = 0.0  # each data owner's lifetime budget; 0 means "= epsilon"
    ledger_dir: str = ""  # simulated owners' ledgers; "" means <output_dir>/ledgers
    min_clients: int = 1  # stop cleanly when fewer clients have budget left
    # deployment (issue 4)
    round_timeout: float = 600.0  # seconds the server waits for one round's replies
    # robustness (issue 6)
    aggregator: str = "fedavg"
    byzantine: int = 0  # malicious clients per round the robust rule must tolerate
    attack: str = "none"  # simulation only: what the attacking clients send
    attackers: float = 0.0  # simulation only: fraction of clients that attack
    max_update_norm: float = 0.0  # reject updates farther than this from the global model (0: off)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the option and the fix for the first bad value."""
        _require(self.clients >= 1, "--clients must be at least 1", self.clients)
        _require(self.rounds >= 1, "--rounds must be at least 1", self.rounds)
        _require(self.local_epochs >= 1, "--local-epochs must be at least 1", self.local_epochs)
        _require(self.batch_size >= 1, "--batch-size must be at least 1", self.batch_size)
        _require(_finite_positive(self.lr), "--lr must be a positive number", self.lr)
        _require(
            _finite_positive(self.epsilon),
            "--epsilon must be a positive number (the privacy budget per client)",
            self.epsilon,
        )
        _require(
            0.0 < self.delta < 1.0,
            "--delta must be between 0 and 1 (typically below 1/number-of-records)",
            self.delta,
        )
        _require(
            _finite_positive(self.max_grad_norm),
            "--max-grad-norm must be a positive number",
            self.max_grad_norm,
        )
        _require(
            self.partition in PARTITION_SCHEMES,
            f"--partition must be one of {', '.join(PARTITION_SCHEMES)}",
            self.partition,
        )
        _require(_finite_positive(self.alpha), "--alpha must be a positive number", self.alpha)
        _require(
            0.0 < self.fraction <= 1.0,
            "--fraction must be in (0, 1]: the share of clients sampled each round",
            self.fraction,
        )
        _require(self.task in TASKS, f"--task must be one of {', '.join(TASKS)}", self.task)
        _require(
            math.isfinite(self.budget_epsilon) and self.budget_epsilon >= 0,
            "--budget-epsilon must be 0 (use --epsilon) or a positive number",
            self.budget_epsilon,
        )
        _require(self.min_clients >= 1, "--min-clients must be at least 1", self.min_clients)
        _require(
            _finite_positive(self.round_timeout),
            "--round-timeout must be a positive number of seconds",
            self.round_timeout,
        )
        _require(
            self.aggregator in AGGREGATORS,
            f"--aggregator must be one of {', '.join(AGGREGATORS)}",
            self.aggregator,
        )
        _require(self.byzantine >= 0, "--byzantine must be 0 or more", self.byzantine)
        _require(
            self.attack in ATTACKS, f"--attack must be one of {', '.join(ATTACKS)}", self.attack
        )
        _require(
            0.0 <= self.attackers < 1.0, "--attackers must be a fraction in [0, 1)", self.attackers
        )
        _require(
            math.isfinite(self.max_update_norm) and self.max_update_norm >= 0.0,
            "--max-update-norm must be 0 (off) or a positive number",
            self.max_update_norm,
        )

    @property
    def clients_per_round(self) -> int:
        """How many clients train each round (Flower samples int(N * fraction), at least 1)."""
        return max(1, int(self.clients * self.fraction))

    def to_run_config(self) -> dict[str, int | float | bool | str]:
        """Flower run-config form: hyphenated keys, scalar values."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Read back what `to_run_config` wrote; unknown keys are ignored, missing ones default."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in run_config:
                values[f.name] = _coerce(f, run_config[key])
        return cls(**values)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _coerce(field: dataclasses.Field[Any], value: Any) -> Any:
    kind = {"int": int, "float": float, "bool": bool, "str": str}[str(field.type)]
    if kind is bool and isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return kind(value)


def _finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _require(ok: bool, message: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{message} (got {value!r})")
