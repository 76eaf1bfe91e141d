"""The coordinator's half of distributed DP: decode the noisy sum SecAgg+ unmasks, apply it.

Kairouz, Liu and Steinke 2021 (DDG). The clients (client/distributed_dp_mod.py) clip,
encode and noise their updates before masking; Flower's `SecAggPlusWorkflow`, configured
as fedmodel.distributed_secagg says, unmasks only the modular sum of the survivors'
residues. This strategy inverts the workflow's dequantization, decodes the sum
(fedmodel.privacy.distributed_dp.decode), divides by the survivors and adds that mean
update to the global model. Every unmasked sum is a release: recorded with its survivors
(fedmodel.privacy.distributed_ledger) before the model moves, and the budget is checked
before each round.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flwr.common import Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from fedmodel.config import RunConfig
from fedmodel.distributed_secagg import (
    ROTATION_SEED_KEY,
    WORKFLOW_CLIPPING_RANGE,
    WORKFLOW_MAX_WEIGHT,
    WORKFLOW_QUANTIZATION_RANGE,
    distributed_parameters,
    flatten,
    residues_from_workflow,
    unflatten,
)
from fedmodel.privacy.distributed_accounting import DistributedRelease
from fedmodel.privacy.distributed_dp import DistributedDpParameters, decode
from fedmodel.privacy.distributed_ledger import DistributedBudgetStop, DistributedLedger
from server.run_record import RunRecorder
from server.secagg import FitFailures, FitReplies, SecureFedAvg
from server.strategy import FederationStopped


class DistributedDpFedAvg(SecureFedAvg):
    """FedAvg of distributed-DP updates: the global model moves by the decoded mean update."""

    def __init__(
        self,
        recorder: RunRecorder,
        protocol: dict[str, Any],
        min_clients: int,
        mechanism: DistributedDpParameters,
        ledger: DistributedLedger,
        rotation_seeds: dict[int, int],
        **fedavg: Any,
    ) -> None:
        super().__init__(recorder, protocol, min_clients, **fedavg)
        self.mechanism = mechanism
        self.ledger = ledger
        self.rotation_seeds = rotation_seeds  # round -> the seed sent with its instructions
        self._global: list[np.ndarray] = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        """Stop before a round whose release, at the sampled cohort, would overspend."""
        instructions = super().configure_fit(server_round, parameters, client_manager)
        try:
            self.ledger.check(DistributedRelease(server_round, self.mechanism, len(instructions)))
        except DistributedBudgetStop as stop:
            raise FederationStopped(str(stop)) from None
        self._global = parameters_to_ndarrays(parameters)
        return instructions

    def aggregate_fit(
        self, server_round: int, results: FitReplies, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Record the release (the sum is unmasked already), then apply its mean update."""
        epsilon = None
        if results:
            survivors = len(results)
            release = DistributedRelease(server_round, self.mechanism, survivors)
            epsilon = self.ledger.record(release)
            self.recorder.record_distributed_release(release, epsilon)
        unmasked, metrics = super().aggregate_fit(server_round, results, failures)
        if unmasked is None or epsilon is None:
            return None, {}
        (vector,) = parameters_to_ndarrays(unmasked)
        summed = residues_from_workflow(vector, survivors, self.mechanism.modulus)
        mean_update = decode(summed, self.mechanism, self.rotation_seeds[server_round]) / survivors
        updated = unflatten(flatten(self._global) + mean_update, self._global)
        return ndarrays_to_parameters(updated), {**metrics, "client_level_epsilon": epsilon}


def distributed_dp_strategy(
    config: RunConfig,
    recorder: RunRecorder,
    protocol: dict[str, Any],
    dimension: int,
    fedavg: dict[str, Any],
) -> DistributedDpFedAvg:
    """The strategy for `config`, and `protocol` set to the workflow ranges it needs.

    Each round's rotation seed is drawn before the round from the run seed (reproducible,
    and independent of the updates, which is what the overflow bound needs); it is public
    and rides with each round's fit config (`fedavg`'s, which carries a deployed run's
    shared config too). The clients' noise never depends on it.
    """
    mechanism = distributed_parameters(config, dimension)
    protocol.update(
        max_weight=WORKFLOW_MAX_WEIGHT,
        clipping_range=WORKFLOW_CLIPPING_RANGE,
        quantization_range=WORKFLOW_QUANTIZATION_RANGE,
        modulus_range=mechanism.modulus,
        distributed_dp=dataclasses.asdict(mechanism),
    )
    seeds = {
        server_round: int(np.random.SeedSequence((config.seed, server_round)).generate_state(1)[0])
        for server_round in range(1, config.rounds + 1)
    }
    budget = config.distributed_epsilon or None
    run_id = config.run_uid or recorder.run_dir.name  # as the federation ledger keys runs
    fit_config = fedavg.pop("on_fit_config_fn")
    return DistributedDpFedAvg(
        recorder,
        protocol,
        config.min_clients,
        mechanism,
        DistributedLedger(recorder.run_dir, run_id, config.delta, budget),
        seeds,
        on_fit_config_fn=lambda server_round: {
            **fit_config(server_round),
            ROTATION_SEED_KEY: seeds[server_round],
        },
        **fedavg,
    )
