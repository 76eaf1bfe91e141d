"""The SecAgg+ server workflow: FedAvg in which the coordinator only ever sees the sum.

Flower 1.39 offers SecAgg+ (Bell et al. 2020) only on its legacy path: a `LegacyContext`,
a legacy `FedAvg` and `SecAggPlusWorkflow` inside `DefaultWorkflow`, talking to clients
wrapped in `secaggplus_mod` (client/secagg_app.py). The workflow sums masked, quantized
vectors and unmasks only the total; clients that drop out after sharing their keys have
their masks rebuilt from `threshold` of their neighbours' shares. `aggregate_fit` here
receives that one mean in place of every client's parameters and refuses anything else.

Only this aggregation step is SecAgg+'s: model, evaluation, checkpoints, early stop and
run record are wired as for every run (server/wiring.py). Per-client metrics (epsilon,
mechanism history) arrive in plaintext, because they are not secret. Robust aggregation
and update validation need individual updates, so the run config refuses them with
`--secagg`.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import WARNING
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.common import FitRes, NDArrays, Parameters, Scalar, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedmodel.config import RunConfig
from fedmodel.protocol import SERVER_ROUND_KEY
from fedmodel.run_directory import CHECKPOINTS_DIR, write_json_atomic
from fedmodel.secagg import CLIPPING_RANGE, MODULUS_RANGE, QUANTIZATION_RANGE, metrics_from_legacy
from server.checkpoint import save_checkpoint
from server.reply_schema import InvalidReply, train_report
from server.resume import RoundEvaluation
from server.run_record import RunRecorder
from server.strategy import FederationStopped

REPORT_FILE = "secagg.json"
# (run, recorder, protocol to update with the workflow's ranges, model size, FedAvg's
# arguments) -> the strategy: how a mechanism under SecAgg+ replaces SecureFedAvg
SecureStrategyBuilder = Callable[
    [RunConfig, RunRecorder, dict[str, Any], int, dict[str, Any]], "SecureFedAvg"
]


class SecureFedAvg(LegacyFedAvg):
    """Legacy FedAvg over what SecAgg+ reveals: one weighted mean, never a single update."""

    def __init__(
        self, recorder: RunRecorder, protocol: dict[str, Any], min_clients: int, **fedavg: Any
    ) -> None:
        super().__init__(**fedavg)
        self.recorder = recorder
        self.protocol = protocol
        self.min_clients = min_clients
        self.rounds: list[dict[str, Any]] = []
        self._sampled = 0

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self._sampled = len(instructions)
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Record the survivors' metrics and pass on the unmasked mean, the only update."""
        parameter_sets = {tuple(fitres.parameters.tensors) for _, fitres in results}
        if len(parameter_sets) > 1:
            raise RuntimeError("SecAgg+ is not in effect: the strategy got individual updates")
        reports = {}
        for _, fitres in results:  # the sum is taken already; an invalid report is not kept
            try:
                report = train_report(
                    metrics_from_legacy(fitres.metrics), self.recorder.config.sample_dp
                )
            except InvalidReply as invalid:
                log(WARNING, "secure aggregation round %d: %s", server_round, invalid)
                continue
            reports[str(report.partition_id)] = report
        self.recorder.record_replies(server_round, reports)
        reasons = sorted({_reason(failure) for failure in failures})
        for reason in reasons:
            log(WARNING, "secure aggregation round %d: %s", server_round, reason)
        self._record_round(
            server_round,
            aggregated=bool(results),
            survivors=len(results),
            parameter_sets_received=len(parameter_sets),
            failures=reasons,
        )
        if len(results) < self.min_clients:
            raise FederationStopped(
                f"only {len(results)} clients trained in round {server_round}; "
                f"at least {self.min_clients} needed"
            )
        if not results:
            return None, {}
        return results[0][1].parameters, {"clients": len(results)}

    def note_round_without_aggregate(self, server_round: int) -> None:
        """SecAgg+ halts a round (too few survivors) without calling aggregate_fit: no
        client trained, so the run stops cleanly, as with too few clients (`min_clients`).
        """
        if server_round > 0 and all(r["round"] != server_round for r in self.rounds):
            self._record_round(server_round, aggregated=False, survivors=0)
            raise FederationStopped(
                f"secure aggregation of round {server_round} halted: some client kept fewer "
                "than --secagg-threshold live neighbours"
            )

    def _record_round(self, server_round: int, **facts: Any) -> None:
        self.rounds.append({"round": server_round, "sampled": self._sampled, **facts})
        write_json_atomic(
            self.recorder.run_dir / REPORT_FILE, {"protocol": self.protocol, "rounds": self.rounds}
        )


def run_secagg(
    grid: Grid,
    context: Context,
    config: RunConfig,
    model: torch.nn.Module,
    evaluate_round: RoundEvaluation,
    recorder: RunRecorder,
    largest_client: int,
    strategy_builder: SecureStrategyBuilder | None = None,
) -> None:
    """Run `config.rounds` rounds of SecAgg+ FedAvg, evaluating and checkpointing each.

    `largest_client`: the most examples a client holds (the harness knows it); every
    client's weight n / largest_client is then at most 1, so no masked sum overflows.
    `strategy_builder` replaces SecureFedAvg and the workflow's ranges in `protocol`
    (distributed DP: server.distributed_dp.distributed_dp_strategy).
    Raises FederationStopped when too few clients are left.
    """
    reference = model.state_dict()
    protocol: dict[str, Any] = {
        "shares": config.secagg_shares,
        "threshold": config.secagg_threshold,
        "max_weight": largest_client,
        "clipping_range": CLIPPING_RANGE,
        "quantization_range": QUANTIZATION_RANGE,
        "modulus_range": MODULUS_RANGE,
    }

    def evaluate_fn(
        server_round: int, arrays: NDArrays, _: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        strategy.note_round_without_aggregate(server_round)
        state = {
            name: torch.from_numpy(np.asarray(array)).to(reference[name].dtype)
            for name, array in zip(reference, arrays, strict=True)
        }
        metrics = evaluate_round(server_round, ArrayRecord(state))
        save_checkpoint(recorder.run_dir / CHECKPOINTS_DIR, server_round, state)
        if metrics is None:  # nothing scored on the server
            return None
        scores: dict[str, Scalar] = {  # whatever the task scores, besides the loss
            key: cast(float, value) for key, value in metrics.items() if key != "loss"
        }
        return cast(float, metrics["loss"]), scores

    fedavg: dict[str, Any] = {
        "fraction_fit": config.fraction,
        "fraction_evaluate": 0.0,
        "min_fit_clients": config.clients_per_round,
        "min_available_clients": config.clients,
        "evaluate_fn": evaluate_fn,
        "initial_parameters": ndarrays_to_parameters([t.cpu().numpy() for t in reference.values()]),
    }
    strategy: SecureFedAvg
    if strategy_builder is not None:
        dimension = sum(t.numel() for t in reference.values())
        strategy = strategy_builder(config, recorder, protocol, dimension, fedavg)
    else:
        strategy = SecureFedAvg(
            recorder,
            protocol,
            config.min_clients,
            on_fit_config_fn=lambda server_round: {SERVER_ROUND_KEY: server_round},
            **fedavg,
        )
    workflow = SecAggPlusWorkflow(
        num_shares=config.secagg_shares,
        reconstruction_threshold=config.secagg_threshold,
        max_weight=float(protocol["max_weight"]),
        clipping_range=protocol["clipping_range"],
        quantization_range=protocol["quantization_range"],
        modulus_range=protocol["modulus_range"],
        timeout=config.round_timeout,
    )
    legacy = LegacyContext(
        context, config=ServerConfig(num_rounds=config.rounds), strategy=strategy
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)


def _reason(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    """The error a dropped client replied with (Flower wraps it in an Exception)."""
    if isinstance(failure, BaseException) and failure.args:
        error = failure.args[0]
        return str(getattr(error, "reason", error))
    return str(failure)
