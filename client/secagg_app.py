"""SecAgg+ ClientApp: the same local DP training as client/app.py, its reply masked.

Flower 1.39 runs SecAgg+ only for legacy clients built from a `client_fn`, so a
NumPyClient wraps `client.app.train_local_model` (same data, same DP-SGD, same owner
ledger and budget) and Flower's `secaggplus_mod` masks what it returns: the coordinator
receives masked integers, never the weights. Metrics (loss, epsilon and the mechanism
history) are not secret and travel in plaintext beside the masked vector.

A deployed run with `--dp distributed` masks differently (`masking_for_run`): the node
trains without DP-SGD, as in simulation, and FedModel's own mod
(client/distributed_dp_mod.py) clips, encodes and noises the update before it is masked.

A simulated client trains on the partition the harness gives it (simulations/apps.py)
and weighs its update by its example count. A deployed node trains on its own file
(client/local_data.py), scores the model it received on its held-out rows first (as
client/app.py does) and weighs its update 1: the coordinator runs SecAgg+ with
`max_weight` 1, so the secure sum is the plain sum and no node's size is inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Error, Message, MessageType
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import NDArrays, Scalar

from client.app import train_local_model
from client.distributed_dp_mod import distributed_dp_mod
from client.local_data import (
    ClientRows,
    Metrics,
    describe_local_data,
    holdout_metrics,
    is_deployed,
    node_training_rows,
)
from fedmodel.config import RunConfig
from fedmodel.data import row_count
from fedmodel.errors import ConfigError
from fedmodel.privacy.budget import BUDGET_EXHAUSTED_CODE, BudgetExhausted
from fedmodel.protocol import (
    EVALUATION_PREFIX,
    LEDGER_PATH_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
)
from fedmodel.secagg import legacy_metrics

PartitionLoader = Callable[[RunConfig, int], ClientRows]  # (run, partition) -> its rows
# (client, round, plaintext weights, weight): how a harness sees what was masked
UpdateObserver = Callable[[int, int, NDArrays, int], None]
# In a node's directory: where it keeps each round's plaintext update, if the owner made it
UPDATES_DIR = "secagg-updates"


class SecAggTrainingClient(NumPyClient):
    """One data owner: DP training on its rows, weights as NumPy arrays."""

    def __init__(
        self,
        context: Context,
        partitions: PartitionLoader | None,
        observe: UpdateObserver | None = None,
    ) -> None:
        self.simulated = partitions is not None and PARTITION_ID_KEY in context.node_config
        if not self.simulated and not is_deployed(context):
            raise ConfigError("this node has neither a data file (data-path) nor a partition")
        self.context = context
        self.partitions = partitions
        self.observe = observe
        self.config = RunConfig.from_run_config(context.run_config)

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        rows = self._rows(config)
        global_state = self._state(rows, parameters)
        server_round = int(config[SERVER_ROUND_KEY])
        evaluation: Metrics = {}
        if not self.simulated:  # score what was received first, as client/app.py does
            scores = holdout_metrics(config, self.context, global_state)
            evaluation = {EVALUATION_PREFIX + key: value for key, value in scores.items()}
        state, metrics = train_local_model(
            self.config, self.context, rows, global_state, server_round
        )
        arrays = [tensor.numpy() for tensor in state.values()]
        weight = row_count(rows.data) if self.simulated else 1
        if self.observe is not None:
            self.observe(rows.index, server_round, arrays, weight)
        if not self.simulated:
            keep_update(self.context, server_round, arrays)
        return arrays, weight, legacy_metrics(metrics | evaluation)

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """A deployed node scores the run's final model on its held-out rows."""
        if self.simulated:
            raise ConfigError("a simulated SecAgg+ run is evaluated on the server")
        state = self._state(self._rows(config), parameters)
        scores = holdout_metrics(config, self.context, state)
        rows, loss = scores[NUM_EXAMPLES_KEY], scores["loss"]
        assert isinstance(rows, int) and isinstance(loss, int | float)
        return float(loss), rows, legacy_metrics(scores)

    def _rows(self, config: dict[str, Scalar]) -> ClientRows:
        if self.partitions is not None and self.simulated:
            partition = int(str(self.context.node_config[PARTITION_ID_KEY]))
            return self.partitions(self.config, partition)
        return node_training_rows(self.context, config)

    @staticmethod
    def _state(rows: ClientRows, parameters: NDArrays) -> dict[str, torch.Tensor]:
        names = rows.task.model().state_dict()
        return {
            name: torch.from_numpy(np.array(array, copy=True))
            for name, array in zip(names, parameters, strict=True)
        }


def keep_update(context: Context, server_round: int, arrays: NDArrays) -> None:
    """Keep the plaintext update in NODE/secagg-updates/ when the owner created it.

    The owner's check on SecAgg+, never sent anywhere: what the coordinator's unmasked
    sum can be compared with, and what no masked vector it received should resemble.
    """
    node_dir = Path(str(context.node_config[LEDGER_PATH_KEY])).expanduser().parent
    kept = node_dir / UPDATES_DIR
    if kept.is_dir():
        path = kept / f"run-{context.run_id}-round-{server_round}.npz"
        np.savez(path, *arrays)


def query_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A deployed run's query round (the node's statistics and name), which Flower's
    legacy clients cannot answer: the same answer as client/app.py's."""
    if msg.metadata.message_type == MessageType.QUERY:
        return describe_local_data(msg, context)
    return call_next(msg, context)


def budget_refusal_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A spent budget is an error reply with our code (a dropout to SecAgg+), not a crash."""
    try:
        return call_next(msg, context)
    except BudgetExhausted as refusal:
        return Message(error=Error(BUDGET_EXHAUSTED_CODE, str(refusal)), reply_to=msg)


def masking_for_run(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """What a deployed node masks with: FedModel's distributed-DP mod for a run whose
    config says `--dp distributed` (the owner's policy has accepted it: client/policy.py),
    Flower's `secaggplus_mod` for any other SecAgg+ run."""
    if RunConfig.from_run_config(context.run_config).distributed_dp:
        return DISTRIBUTED_DP_MASKING(msg, context, call_next)
    return secaggplus_mod(msg, context, call_next)


DISTRIBUTED_DP_MASKING = distributed_dp_mod()


def secagg_client_app(
    partitions: PartitionLoader | None,
    mods: Sequence[Mod] = (),
    observe: UpdateObserver | None = None,
    masking: Mod = secaggplus_mod,
) -> ClientApp:
    """The SecAgg+ ClientApp training on `partitions`, `mods` outermost; `observe` (a
    test harness's) sees each plaintext update before it is masked; `masking` is Flower's
    SecAgg+ mod or one that runs it (client/distributed_dp_mod.py)."""

    def client_fn(context: Context) -> Client:
        return SecAggTrainingClient(context, partitions, observe).to_client()

    return ClientApp(client_fn=client_fn, mods=[*mods, query_mod, budget_refusal_mod, masking])


# what a deployed node runs: its own file, weight 1, masking as its run asks
app = secagg_client_app(None, masking=masking_for_run)
