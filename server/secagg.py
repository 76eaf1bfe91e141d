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

In a deployed federation (`SecAggNodes`) the run's members are the enrolled nodes, known
by their authenticated node IDs; every node weighs its update 1 (`max_weight` 1), so the
unmasked sum is the plain sum of the updates and tells nothing of any node's size. The
nodes score each model they receive on their held-out rows before training (the scores
ride in plaintext beside the masked vector), and the last round's model in a legacy
evaluate round.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from logging import WARNING
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedmodel.config import RunConfig
from fedmodel.protocol import EVALUATION_PREFIX, SERVER_ROUND_KEY
from fedmodel.run_directory import CHECKPOINTS_DIR, write_json_atomic
from fedmodel.secagg import CLIPPING_RANGE, MODULUS_RANGE, QUANTIZATION_RANGE, metrics_from_legacy
from server.checkpoint import ResumePoint, restore_rng, rng_state, save_checkpoint
from server.federated_evaluation import record_node_scores
from server.reply_schema import InvalidReply, train_report
from server.resume import RoundEvaluation, pause_after
from server.run_record import RunRecorder
from server.strategy import FederationStopped, Members

REPORT_FILE = "secagg.json"
# What Flower's legacy workflows hand a strategy after a stage: replies, and failures
FitReplies = list[tuple[ClientProxy, FitRes]]
FitFailures = list[tuple[ClientProxy, FitRes] | BaseException]
EvaluateReplies = list[tuple[ClientProxy, EvaluateRes]]
EvaluateFailures = list[tuple[ClientProxy, EvaluateRes] | BaseException]
# (run, recorder, protocol to update with the workflow's ranges, model size, FedAvg's
# arguments) -> the strategy: how a mechanism under SecAgg+ replaces SecureFedAvg
SecureStrategyBuilder = Callable[
    [RunConfig, RunRecorder, dict[str, Any], int, dict[str, Any]], "SecureFedAvg"
]  # FedAvg's arguments include `nodes` (SecAggNodes | None) and the fit and evaluate configs


@dataclass(frozen=True)
class SecAggNodes:
    """A deployed run's side of SecAgg+: its members (client numbers by node ID, the
    registry's, never a node's word) and what every message carries (client numbers and
    the encoding: server/deployment.py)."""

    members: Members
    shared: ConfigRecord


class SecureFedAvg(LegacyFedAvg):
    """Legacy FedAvg over what SecAgg+ reveals: one weighted mean, never a single update."""

    def __init__(
        self,
        recorder: RunRecorder,
        protocol: dict[str, Any],
        min_clients: int,
        nodes: SecAggNodes | None = None,
        **fedavg: Any,
    ) -> None:
        super().__init__(**fedavg)
        self.recorder = recorder
        self.protocol = protocol
        self.min_clients = min_clients
        self.nodes = nodes
        self.rounds: list[dict[str, Any]] = []
        self._sampled = 0
        self._survivors: set[str] = set()  # who sent a masked vector in the last round

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self._sampled = len(instructions)
        return instructions

    def aggregate_fit(
        self, server_round: int, results: FitReplies, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Record the survivors' metrics and pass on the unmasked mean, the only update."""
        parameter_sets = {tuple(fitres.parameters.tensors) for _, fitres in results}
        if len(parameter_sets) > 1:
            raise RuntimeError("SecAgg+ is not in effect: the strategy got individual updates")
        previous = server_round - 1
        if self.nodes is not None and previous not in {r["round"] for r in self.recorder.rounds}:
            scored = [(proxy.node_id, metrics_from_legacy(res.metrics)) for proxy, res in results]
            record_node_scores(
                self, previous, scored, self.nodes.members.weight_caps, EVALUATION_PREFIX
            )
        self._survivors = {proxy.cid for proxy, _ in results}
        reports = {}
        for proxy, fitres in results:  # the sum is taken already; an invalid report is not kept
            try:
                report = train_report(
                    metrics_from_legacy(fitres.metrics), self.recorder.config.sample_dp
                )
                client = self._client(proxy, report.partition_id)
            except InvalidReply as invalid:
                log(WARNING, "secure aggregation round %d: %s", server_round, invalid)
                continue
            reports[client] = report
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

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Only a deployed run's last model is evaluated apart (the nodes score the others
        on the next round's train message), by the nodes that survived its round: one that
        dropped out would only be waited for until --round-timeout."""
        if self.nodes is None or server_round < self.recorder.config.rounds:
            return []
        sampled = super().configure_evaluate(server_round, parameters, client_manager)
        return [(proxy, ins) for proxy, ins in sampled if proxy.cid in self._survivors]

    def aggregate_evaluate(
        self, server_round: int, results: EvaluateReplies, failures: EvaluateFailures
    ) -> tuple[float | None, dict[str, Scalar]]:
        """The nodes' scores of the last model, validated and capped (never Flower's mean,
        which weighs nodes by their own counts)."""
        if self.nodes is None:
            return None, {}
        scored = [(proxy.node_id, dict(res.metrics)) for proxy, res in results]
        scores = record_node_scores(self, server_round, scored, self.nodes.members.weight_caps)
        if scores is None:
            return None, {}
        return scores["loss"], {key: value for key, value in scores.items() if key != "loss"}

    def reject(self, server_round: int, node: int, reason: str, client: str | None = None) -> None:
        """Log and record why `node`'s reply in `server_round` is not used."""
        log(WARNING, "rejected the reply of node %d: %s", node, reason)
        if self.nodes is not None:
            client = self.nodes.members.clients.get(node, client)
        self.recorder.record_rejection(server_round, node, client, reason)

    def _client(self, proxy: ClientProxy, claimed: int) -> str:
        """The client a reply is from: the registry's number for a deployed node, the
        partition the harness set for a simulated one."""
        if self.nodes is None:
            return str(claimed)
        if proxy.node_id not in self.nodes.members.clients:
            raise InvalidReply(f"node {proxy.node_id} is not a member of this run")
        return self.nodes.members.clients[proxy.node_id]

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


class ShiftedLegacyRounds(LegacyStrategy):
    """Presents round k of Flower's `DefaultWorkflow` (which counts from 1) to `inner` as
    round `offset + k`: a resumed run's rounds keep their numbers, which the nodes'
    ledgers and replay rule key on. A resumed run (`resumed`) does not evaluate again the
    model it starts from: that was evaluated and checkpointed before the run stopped.
    """

    def __init__(self, inner: SecureFedAvg, offset: int, resumed: bool) -> None:
        self.inner = inner
        self.offset = offset
        self.resumed = resumed

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        return self.inner.configure_fit(server_round + self.offset, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: FitReplies, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        return self.inner.aggregate_fit(server_round + self.offset, results, failures)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.inner.configure_evaluate(server_round + self.offset, parameters, client_manager)

    def aggregate_evaluate(
        self, server_round: int, results: EvaluateReplies, failures: EvaluateFailures
    ) -> tuple[float | None, dict[str, Scalar]]:
        return self.inner.aggregate_evaluate(server_round + self.offset, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        if self.resumed and server_round == 0:
            return None
        return self.inner.evaluate(server_round + self.offset, parameters)


def run_secagg(
    grid: Grid,
    context: Context,
    config: RunConfig,
    model: torch.nn.Module,
    evaluate_round: RoundEvaluation,
    recorder: RunRecorder,
    max_weight: int,
    nodes: SecAggNodes | None = None,
    strategy_builder: SecureStrategyBuilder | None = None,
    resume: ResumePoint | None = None,
) -> None:
    """Run the rounds of SecAgg+ FedAvg still to run, evaluating and checkpointing each.

    `max_weight`: the largest weight a client gives its update (in simulation its example
    count, which the harness knows; 1 on deployed nodes), so no masked sum overflows.
    `nodes`: a deployed run's members and shared config. `strategy_builder` replaces
    SecureFedAvg and the workflow's ranges in `protocol` (distributed DP:
    server.distributed_dp.distributed_dp_strategy). `resume`: the last completed round's
    checkpoint, which the run goes on from; every round after it draws new keys, masks and
    noise (Flower's SecAgg+ clients draw them afresh from the OS in every round, and no
    checkpoint holds them). Raises FederationStopped when too few clients are left, and
    RunPaused after `stop-after-round`.
    """
    reference = model.state_dict()
    offset = 0 if resume is None else resume.completed_round
    if resume is not None:
        reference = resume.state_dict
    protocol: dict[str, Any] = {
        "shares": config.secagg_shares,
        "threshold": config.secagg_threshold,
        "max_weight": max_weight,
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
        save_checkpoint(
            recorder.run_dir / CHECKPOINTS_DIR,
            server_round,
            state,
            {"strategy": {}, "rng": rng_state(), "record": recorder.state()},
        )
        pause_after(config, server_round, recorder.run_dir)
        if metrics is None:  # nothing scored on the server
            return None
        scores: dict[str, Scalar] = {  # whatever the task scores, besides the loss
            key: cast(float, value) for key, value in metrics.items() if key != "loss"
        }
        return cast(float, metrics["loss"]), scores

    shared: dict[str, Scalar] = {} if nodes is None else dict(nodes.shared)  # type: ignore[arg-type]
    # a deployed run goes on with its --min-clients, as a plain one does
    least = config.clients_per_round if nodes is None else config.min_clients
    fedavg: dict[str, Any] = {
        "fraction_fit": config.fraction if nodes is None else 1.0,
        "fraction_evaluate": 0.0 if nodes is None else 1.0,
        "min_fit_clients": least,
        "min_evaluate_clients": least,
        "min_available_clients": config.clients if nodes is None else least,
        "evaluate_fn": evaluate_fn,
        "initial_parameters": ndarrays_to_parameters([t.cpu().numpy() for t in reference.values()]),
    }
    fedavg |= {
        "nodes": nodes,
        "on_fit_config_fn": lambda server_round: {SERVER_ROUND_KEY: server_round, **shared},
        "on_evaluate_config_fn": lambda server_round: {SERVER_ROUND_KEY: server_round, **shared},
    }
    strategy: SecureFedAvg
    if strategy_builder is not None:
        dimension = sum(t.numel() for t in reference.values())
        strategy = strategy_builder(config, recorder, protocol, dimension, fedavg)
    else:
        strategy = SecureFedAvg(recorder, protocol, config.min_clients, **fedavg)
    workflow = SecAggPlusWorkflow(
        num_shares=config.secagg_shares,
        reconstruction_threshold=config.secagg_threshold,
        max_weight=float(protocol["max_weight"]),
        clipping_range=protocol["clipping_range"],
        quantization_range=protocol["quantization_range"],
        modulus_range=protocol["modulus_range"],
        timeout=config.round_timeout,
    )
    if resume is not None:
        strategy.rounds = [r for r in _reported_rounds(recorder) if r["round"] <= offset]
        restore_rng(resume.rng_state)  # the last thing before the next round samples
    server_config = ServerConfig(
        num_rounds=config.rounds - offset, round_timeout=config.round_timeout
    )
    shifted = ShiftedLegacyRounds(strategy, offset, resumed=resume is not None)
    legacy = LegacyContext(context, config=server_config, strategy=shifted)
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)


def _reported_rounds(recorder: RunRecorder) -> list[dict[str, Any]]:
    """The rounds secagg.json holds (none when the run stopped before its first)."""
    path = recorder.run_dir / REPORT_FILE
    if not path.is_file():
        return []
    return list(json.loads(path.read_text())["rounds"])


def _reason(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    """The error a dropped client replied with (Flower wraps it in an Exception)."""
    if isinstance(failure, BaseException) and failure.args:
        error = failure.args[0]
        return str(getattr(error, "reason", error))
    return str(failure)
