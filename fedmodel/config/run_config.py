"""A run's configuration checked and converted: `RunConfig` over the keys of `RunKeys`.

The CLI builds a `RunConfig`, the simulation runner writes it into the Flower App's run
config (keys are the field names with `-` for `_`), and the ServerApp and ClientApp read
it back with `RunConfig.from_run_config`. pyproject.toml repeats the defaults because
Flower requires them there; a test keeps both equal.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

from fedmodel.config.keys import (
    DEVICE_PATTERN,
    AggregatorName,
    ConfigKey,
    EvaluationMethod,
    describe_keys,
)
from fedmodel.config.run_keys import RunKeys
from fedmodel.errors import ConfigError

AGGREGATORS: tuple[str, ...] = typing.get_args(AggregatorName)
EVALUATION_METHODS: tuple[str, ...] = typing.get_args(EvaluationMethod)
# SecAgg+ sums modulo 2**32 and each client adds up to 2**22 (Flower's defaults).
SECAGG_MAX_CLIENTS_PER_ROUND = 2**32 // 2**22
CSV_SCENARIO = "csv"
TASK_SCENARIO = "task"  # a user's Task (fedmodel simulate task MODULE:ATTR)
# datasets split by a column of their own (clinic, state): the data fixes the client count
NATURAL_DATASETS = frozenset({"covid-clinics", "lending-club"})
PATH_KEYS = ("output_dir", "ledger_dir", "data", "federation_dir")
"""Keys naming a file or directory: a run directory stores them relative to itself."""


@dataclass(frozen=True)
class RunConfig(RunKeys):
    """Resolved settings of one federated run (simulation or deployment).

    The keys, with their sections, help and choices, are declared in `RunKeys`;
    `RunConfig.config_keys()` lists them. This class checks them and converts them.
    """

    @classmethod
    def config_keys(cls) -> dict[str, ConfigKey]:
        """Every key with its help, section and choices, in declaration order."""
        return _keys()

    def __post_init__(self) -> None:
        if self.distributed_dp and not self.secagg:  # the clients' noise needs SecAgg+
            object.__setattr__(self, "secagg", True)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the option and the fix for the first bad value."""
        for spec in _keys().values():
            value = getattr(self, spec.name)
            _require(
                not spec.choices or value in spec.choices,
                f"{spec.flag} must be one of {', '.join(spec.choices)}",
                value,
            )
        _require(self.clients >= 1, "--clients must be at least 1", self.clients)
        _require(self.rounds >= 1, "--rounds must be at least 1", self.rounds)
        _require(self.local_epochs >= 1, "--local-epochs must be at least 1", self.local_epochs)
        _require(self.batch_size >= 1, "--batch-size must be at least 1", self.batch_size)
        _require(_finite_positive(self.lr), "--lr must be a positive number", self.lr)
        _require(
            self.task != "regression" or self.partition == "iid",
            "--partition dirichlet, shard and pathological split by class; a regression "
            "label has none: use --partition iid or --partition-by COLUMN",
            self.partition,
        )
        if self.client_dp:
            self._validate_central_dp()
        if self.distributed_dp:
            self._validate_distributed_dp()
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
        _require(_finite_positive(self.alpha), "--alpha must be a positive number", self.alpha)
        _require(
            0.0 < self.fraction <= 1.0,
            "--fraction must be in (0, 1]: the share of clients sampled each round",
            self.fraction,
        )
        _require(
            math.isfinite(self.budget_epsilon) and self.budget_epsilon >= 0,
            "--budget-epsilon must be 0 (use --epsilon) or a positive number",
            self.budget_epsilon,
        )
        _require(self.min_clients >= 1, "--min-clients must be at least 1", self.min_clients)
        _require(
            self.sites_from_data or self.min_clients <= self.clients_per_round,
            f"--min-clients must be at most the {self.clients_per_round} clients that train each "
            "round (else the first round ends the run); lower it or raise --clients or --fraction",
            self.min_clients,
        )
        _require(
            _finite_positive(self.round_timeout),
            "--round-timeout must be a positive number of seconds",
            self.round_timeout,
        )
        _require(self.byzantine >= 0, "--byzantine must be 0 or more", self.byzantine)
        _require(
            0.0 <= self.attackers < 1.0, "--attackers must be a fraction in [0, 1)", self.attackers
        )
        _require(
            math.isfinite(self.max_update_norm) and self.max_update_norm >= 0.0,
            "--max-update-norm must be 0 (off) or a positive number",
            self.max_update_norm,
        )
        _require(
            0.0 <= self.validation_fraction < 1.0,
            "--validation-fraction must be in [0, 1): the share of each client's training "
            "rows held out to score on (0: score on the test set)",
            self.validation_fraction,
        )
        _require(
            math.isfinite(self.server_lr) and self.server_lr > 0.0,
            "--server-lr must be a positive number (FedAdam's step size)",
            self.server_lr,
        )
        _require(
            0.0 <= self.server_momentum < 1.0,
            "--server-momentum must be in [0, 1) (fedavgm's momentum)",
            self.server_momentum,
        )
        _require(
            math.isfinite(self.proximal_mu) and self.proximal_mu >= 0.0,
            "--proximal-mu must be 0 or a positive number",
            self.proximal_mu,
        )
        _require(
            self.stop_after_round >= 0,
            "--stop-after-round must be 0 (off) or a round number",
            self.stop_after_round,
        )

        if self.secagg:
            self._validate_secagg()
        _require(
            re.fullmatch(DEVICE_PATTERN, self.device) is not None,
            "--device must be auto, cpu, cuda or cuda:N",
            self.device,
        )
        _require(
            math.isfinite(self.gpus_per_client) and self.gpus_per_client >= 0.0,
            "--gpus-per-client must be 0 (CPU only) or a positive share of a GPU, e.g. 0.25",
            self.gpus_per_client,
        )

    def _validate_secagg(self) -> None:
        """SecAgg+ preconditions (Flower's clients crash on an even number of shares)."""
        per_round = self.clients_per_round
        _require(
            self.aggregator == "fedavg" and self.max_update_norm == 0.0 and self.attack == "none",
            "--secagg hides individual updates, so it works only with --aggregator fedavg, "
            "no --max-update-norm and no --attack",
            (self.aggregator, self.max_update_norm, self.attack),
        )
        _require(
            self.byzantine == 0,
            "--secagg hides individual updates, which --byzantine needs to tolerate malicious "
            "clients; drop one of them",
            self.byzantine,
        )
        _require(
            not self.client_dp,
            "--dp client/both clips each update on the server, which --secagg hides; "
            "use --dp sample or --dp distributed with --secagg",
            self.dp,
        )
        _require(
            3 <= self.secagg_shares <= per_round and self.secagg_shares % 2 == 1,
            f"--secagg-shares must be odd, at least 3 and at most the {per_round} clients per "
            "round (Flower's SecAgg+ clients crash on an even number)",
            self.secagg_shares,
        )
        _require(
            self.secagg_shares / 2 < self.secagg_threshold < self.secagg_shares,
            "--secagg-threshold must be below --secagg-shares and above half of it (else a "
            "coordinator could collect both kinds of a client's key shares)",
            self.secagg_threshold,
        )
        _require(
            per_round < SECAGG_MAX_CLIENTS_PER_ROUND,
            f"--secagg sums at most {SECAGG_MAX_CLIENTS_PER_ROUND - 1} clients per round "
            "(Flower's 32-bit modulus); lower --clients or --fraction",
            per_round,
        )
        tolerated = self.secagg_shares - self.secagg_threshold
        _require(
            0 <= self.secagg_dropouts <= tolerated,
            f"--secagg-dropouts must be between 0 and shares - threshold = {tolerated}, "
            "the dropouts SecAgg+ survives",
            self.secagg_dropouts,
        )

    def _validate_distributed_dp(self) -> None:
        """Distributed DP preconditions; SecAgg+'s own come from `_validate_secagg`."""
        _require(
            self.aggregator == "fedavg" and self.byzantine == 0,
            "--dp distributed adds noise to a sum of clipped updates: it needs --aggregator "
            "fedavg and no --byzantine",
            (self.aggregator, self.byzantine),
        )
        _require(
            _finite_positive(self.distributed_clip),
            "--distributed-clip must be a positive number",
            self.distributed_clip,
        )
        _require(
            _finite_positive(self.distributed_noise),
            "--distributed-noise must be a positive number",
            self.distributed_noise,
        )
        _require(
            2 <= self.distributed_bits <= 32,
            "--distributed-bits must be between 2 and 32 (Flower's SecAgg+ modulus is at most "
            "2**32)",
            self.distributed_bits,
        )
        _require(
            math.isfinite(self.distributed_epsilon) and self.distributed_epsilon >= 0,
            "--distributed-epsilon must be 0 (no budget) or a positive number",
            self.distributed_epsilon,
        )

    def _validate_central_dp(self) -> None:
        _require(
            self.aggregator == "fedavg",
            f"--dp {self.dp} needs --aggregator fedavg (the noise is calibrated to a mean)",
            self.aggregator,
        )
        _require(
            _finite_positive(self.central_noise),
            "--central-noise must be a positive number",
            self.central_noise,
        )
        _require(
            _finite_positive(self.central_clipping_norm),
            "--central-clipping-norm must be a positive number",
            self.central_clipping_norm,
        )
        _require(
            math.isfinite(self.central_epsilon) and self.central_epsilon >= 0,
            "--central-epsilon must be 0 (no budget) or a positive number",
            self.central_epsilon,
        )
        if not self.central_adaptive:
            return
        _require(
            0.0 < self.central_target_quantile < 1.0,
            "--central-target-quantile must be in (0, 1)",
            self.central_target_quantile,
        )
        _require(
            _finite_positive(self.central_clip_lr),
            "--central-clip-lr must be a positive number",
            self.central_clip_lr,
        )
        _require(
            math.isfinite(self.central_count_stddev) and self.central_count_stddev >= 0,
            "--central-count-stddev must be 0 (clients per round / 20) or a positive number",
            self.central_count_stddev,
        )
        _require(
            self.central_noise < 2 * self.central_count_stddev_or_default,
            f"--central-noise with adaptive clipping must stay below twice the clipped-count "
            f"noise {self.central_count_stddev_or_default:g}; raise --central-count-stddev",
            self.central_noise,
        )

    @property
    def sample_dp(self) -> bool:
        """Clients train with DP-SGD (sample-level DP for each owner's records)."""
        return self.dp in ("sample", "both")

    @property
    def client_dp(self) -> bool:
        """The server clips and noises client updates (client-level DP)."""
        return self.dp in ("client", "both")

    @property
    def distributed_dp(self) -> bool:
        """Each client clips and noises its update under SecAgg+ (client-level DP that
        holds against the server)."""
        return self.dp == "distributed"

    @property
    def central_count_stddev_or_default(self) -> float:
        """Andrew et al.'s suggestion: expected clients per round / 20."""
        return self.central_count_stddev or self.clients_per_round / 20

    @property
    def sites_from_data(self) -> bool:
        """Whether the data, not --clients, decides how many clients there are."""
        if self.scenario == CSV_SCENARIO:
            return bool(self.partition_by)
        return self.dataset in NATURAL_DATASETS

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
        for spec in _keys().values():
            if spec.run_config_key in run_config:
                values[spec.name] = _coerce(spec.kind, run_config[spec.run_config_key])
        return cls(**values)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def relative_to(self, run_dir: Path) -> RunConfig:
        """This config as `run_dir` stores it: paths relative to the run directory, so that
        the directory names no path of this machine and still works when it is moved."""
        base = run_dir.absolute()
        return self.replace(
            **{
                name: os.path.relpath(Path(value).absolute(), base)
                for name in PATH_KEYS
                if (value := getattr(self, name))
            }
        )

    def located_in(self, run_dir: Path) -> RunConfig:
        """`relative_to`'s inverse: the stored paths made absolute again (a run directory
        written before paths were relative holds absolute ones; they stay as they are)."""
        base = run_dir.absolute()
        return self.replace(
            **{
                name: os.path.normpath(base / value)
                for name in PATH_KEYS
                if (value := getattr(self, name))
            }
        )


@cache
def _keys() -> dict[str, ConfigKey]:
    return describe_keys(RunConfig)


def _coerce(kind: type, value: Any) -> Any:
    if kind is bool and isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return kind(value)


def _finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _require(ok: bool, message: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{message} (got {value!r})")
