"""SecAgg+ ClientApp: the same local DP training as client/app.py, its reply masked.

Flower 1.39 runs SecAgg+ only for legacy clients built from a `client_fn`, so a
NumPyClient wraps `client.app.train_local_model` (same data, same DP-SGD, same owner
ledger and budget) and Flower's `secaggplus_mod` masks what it returns: the coordinator
receives masked integers, never the weights. Metrics (examples, loss, epsilon and the
mechanism history) are not secret and travel in plaintext beside the masked vector.
Simulation only: the harness (simulations/apps.py) builds the app with its partitions;
this module's `app`, what a deployed node would run, refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from flwr.app import Context, Error, Message
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import NDArrays, Scalar

from client.app import train_local_model
from client.local_data import ClientRows
from fedmodel.config import RunConfig
from fedmodel.data import row_count
from fedmodel.errors import ConfigError
from fedmodel.privacy.budget import BUDGET_EXHAUSTED_CODE, BudgetExhausted
from fedmodel.protocol import PARTITION_ID_KEY, SERVER_ROUND_KEY
from fedmodel.secagg import legacy_metrics

PartitionLoader = Callable[[RunConfig, int], ClientRows]  # (run, partition) -> its rows
# (partition, round, plaintext weights, examples): how a harness sees what was masked
UpdateObserver = Callable[[int, int, NDArrays, int], None]


class SecAggTrainingClient(NumPyClient):
    """One simulated data owner: DP training on its partition, weights as NumPy arrays."""

    def __init__(
        self,
        context: Context,
        partitions: PartitionLoader | None,
        observe: UpdateObserver | None = None,
    ) -> None:
        if partitions is None or PARTITION_ID_KEY not in context.node_config:
            raise ConfigError("--secagg runs in simulation only (this node has no partition-id)")
        self.context = context
        self.partitions = partitions
        self.observe = observe
        self.config = RunConfig.from_run_config(context.run_config)
        self.partition_id = int(str(context.node_config[PARTITION_ID_KEY]))

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        rows = self.partitions(self.config, self.partition_id)
        names = rows.task.model().state_dict()
        global_state = {
            name: torch.from_numpy(np.array(array, copy=True))
            for name, array in zip(names, parameters, strict=True)
        }
        server_round = int(config[SERVER_ROUND_KEY])
        state, metrics = train_local_model(
            self.config, self.context, rows, global_state, server_round
        )
        arrays = [tensor.numpy() for tensor in state.values()]
        examples = row_count(rows.data)
        if self.observe is not None:
            self.observe(self.partition_id, server_round, arrays, examples)
        return arrays, examples, legacy_metrics(metrics)


def budget_refusal_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A spent budget is an error reply with our code (a dropout to SecAgg+), not a crash."""
    try:
        return call_next(msg, context)
    except BudgetExhausted as refusal:
        return Message(error=Error(BUDGET_EXHAUSTED_CODE, str(refusal)), reply_to=msg)


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

    return ClientApp(client_fn=client_fn, mods=[*mods, budget_refusal_mod, masking])


app = secagg_client_app(None)  # a deployed node has no SecAgg+ path: it refuses the run
