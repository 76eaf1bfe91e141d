"""Aggregation rules by name, with each rule's precondition checked before a run starts.

Robust rules tolerate up to `byzantine` arbitrary (malicious or broken) updates per round:
- median: coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning").
- trimmed-mean: coordinate-wise mean after dropping the `beta` fraction at each end (ibid.).
- krum / multikrum: the update(s) closest to their n-f-2 nearest neighbours
  (Blanchard et al. 2017, "Machine Learning with Adversaries"); needs n >= 2f+3.
- bulyan: Krum selection then trimmed mean (El Mhamdi et al. 2018); needs n >= 4f+3.
- fedadam: adaptive server optimiser (Reddi et al. 2021, "Adaptive Federated Optimization").
- fedavgm: FedAvg whose server step keeps momentum (Hsu et al. 2019; McMahan et al. 2018
  used it for DP-FedAvg): the step is the averaged update plus `server_momentum` times the
  previous step. Post-processing of what the clients released, so it costs no privacy.
- fedprox: FedAvg on the server; each client adds mu/2 * ||w - w_global||^2 to its local
  loss (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"; the client's
  side is fedmodel.training._ProximalTerm).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)

from fedmodel.config import AGGREGATORS
from fedmodel.errors import ConfigError

TRIMMED_MEAN_BETA = 0.2


def check_aggregator(name: str, replies_per_round: int, byzantine: int) -> None:
    """Raise ConfigError, in one line, when `name` cannot work with these numbers."""
    if name not in AGGREGATORS:
        raise ConfigError(f"unknown aggregator '{name}'; choose one of: {', '.join(AGGREGATORS)}")
    if byzantine < 0:
        raise ConfigError(f"--byzantine must be 0 or more (got {byzantine})")
    needed = {
        "krum": 2 * byzantine + 3,
        "multikrum": 2 * byzantine + 3,
        "bulyan": 4 * byzantine + 3,
    }.get(name)
    if needed is not None and replies_per_round < needed:
        raise ConfigError(
            f"{name} tolerating {byzantine} Byzantine clients needs at least {needed} replies per "
            f"round, but only {replies_per_round} clients train per round; add clients or lower "
            "--byzantine"
        )
    if name == "trimmed-mean" and int(TRIMMED_MEAN_BETA * replies_per_round) < byzantine:
        raise ConfigError(
            f"trimmed-mean trims {int(TRIMMED_MEAN_BETA * replies_per_round)} updates at each end "
            f"with {replies_per_round} replies, fewer than --byzantine {byzantine}; add clients"
        )


class DtypeKeepingFedAdam(FedAdam):
    """FedAdam whose new global model keeps the model's dtypes.

    Flower 1.39's step scales by a float64 NumPy scalar, which NumPy 2 lets turn float32
    arrays into float64: every float32 reply to the next round would then fail the reply
    check (wrong dtype) and the run would stop after round 1.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        dtypes = {name: array.dtype for name, array in (self.current_arrays or {}).items()}
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        kept = {
            name: array.numpy().astype(dtypes[name], copy=False) for name, array in arrays.items()
        }
        return ArrayRecord({name: Array(value) for name, value in kept.items()}), metrics


def build_aggregator(
    name: str,
    replies_per_round: int,
    byzantine: int,
    proximal_mu: float = 0.0,
    server_lr: float = 0.1,
    server_momentum: float = 0.9,
    **common: Any,
) -> FedAvg:
    """The Flower Message-API strategy for `name`; `common` are FedAvg's sampling arguments.

    `proximal_mu` is FedProx's mu (sent to the clients in each round's config);
    `server_lr` is FedAdam's step size (eta), `server_momentum` FedAvgM's momentum.
    """
    check_aggregator(name, replies_per_round, byzantine)
    builders: dict[str, Callable[[], FedAvg]] = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(proximal_mu=proximal_mu, **common),
        "fedadam": lambda: DtypeKeepingFedAdam(eta=server_lr, **common),
        "fedavgm": lambda: FedAvgM(server_momentum=server_momentum, **common),
        "median": lambda: FedMedian(**common),
        "trimmed-mean": lambda: FedTrimmedAvg(beta=TRIMMED_MEAN_BETA, **common),
        "krum": lambda: Krum(num_malicious_nodes=byzantine, **common),
        "multikrum": lambda: MultiKrum(
            num_malicious_nodes=byzantine,
            num_nodes_to_select=replies_per_round - byzantine,
            **common,
        ),
        "bulyan": lambda: Bulyan(num_malicious_nodes=byzantine, **common),
    }
    return builders[name]()
