"""SecAgg+ ClientApp: the same local DP training as client/app.py, its reply masked.

Flower 1.39 runs SecAgg+ only for legacy clients built from a `client_fn`, so a
NumPyClient wraps `client.app.train_local_model` (same data, same DP-SGD, same owner
ledger and budget) and Flower's `secaggplus_mod` masks what it returns: the coordinator
receives masked integers, never the weights. Metrics (examples, loss, epsilon and the
mechanism history) are not secret and travel in plaintext beside the masked vector.
Simulation only: the partition comes from the scenario, as for `client.app` in simulation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Error, Message, MessageType
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import NDArrays, Scalar
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.app import train_local_model
from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError
from fedmodel.models import build_model
from fedmodel.privacy.budget import BUDGET_EXHAUSTED_CODE, BudgetExhausted
from fedmodel.protocol import PARTITION_ID_KEY, SERVER_ROUND_KEY
from fedmodel.secagg import legacy_metrics

SIMULATED_DROPOUT_CODE = 4002  # beside BUDGET_EXHAUSTED_CODE, clear of Flower's 0-8
# Test only: a directory where each simulated client writes its plaintext model, so a test
# can compute plain FedAvg of the survivors. Never set it for a real run.
UPDATE_DUMP_VARIABLE = "FEDMODEL_TEST_SECAGG_UPDATE_DIR"


class SecAggTrainingClient(NumPyClient):
    """One simulated data owner: DP training on its partition, weights as NumPy arrays."""

    def __init__(self, context: Context) -> None:
        if PARTITION_ID_KEY not in context.node_config:
            raise ConfigError("--secagg runs in simulation only (this node has no partition-id)")
        self.context = context
        self.config = RunConfig.from_run_config(context.run_config)
        self.partition_id = int(str(context.node_config[PARTITION_ID_KEY]))

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        from fedmodel.datasets.scenarios import client_partitions

        data = client_partitions(self.config)[self.partition_id]
        names = build_model(self.config.model, data.num_features, data.num_classes).state_dict()
        global_state = {
            name: torch.from_numpy(np.array(array, copy=True))
            for name, array in zip(names, parameters, strict=True)
        }
        server_round = int(config[SERVER_ROUND_KEY])
        state, metrics = train_local_model(
            self.config, self.context, self.partition_id, data, global_state, server_round
        )
        arrays = [tensor.numpy() for tensor in state.values()]
        self._dump_for_tests(arrays, len(data), server_round)
        return arrays, len(data), legacy_metrics(metrics)

    def _dump_for_tests(self, arrays: NDArrays, num_examples: int, server_round: int) -> None:
        directory = os.environ.get(UPDATE_DUMP_VARIABLE)
        if directory:
            path = Path(directory) / f"round-{server_round}-client-{self.partition_id}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, *arrays, num_examples=num_examples)


def budget_refusal_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A spent budget is an error reply with our code (a dropout to SecAgg+), not a crash."""
    try:
        return call_next(msg, context)
    except BudgetExhausted as refusal:
        return Message(error=Error(BUDGET_EXHAUSTED_CODE, str(refusal)), reply_to=msg)


def simulated_dropout_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Simulation only: the last `secagg-dropouts` partitions fail right after sharing keys.

    They answer the masked-vector stage with an error, so the coordinator must rebuild
    their masks from the survivors' key shares: a dropout in the middle of the protocol.
    """
    if msg.metadata.message_type == MessageType.TRAIN and PARTITION_ID_KEY in context.node_config:
        config = RunConfig.from_run_config(context.run_config)
        partition_id = int(str(context.node_config[PARTITION_ID_KEY]))
        stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
        if (
            stage == Stage.COLLECT_MASKED_VECTORS
            and partition_id >= config.clients - config.secagg_dropouts
        ):
            reason = f"client {partition_id}: simulated dropout after sharing its keys"
            return Message(error=Error(SIMULATED_DROPOUT_CODE, reason), reply_to=msg)
    return call_next(msg, context)


def _client_fn(context: Context) -> Client:
    return SecAggTrainingClient(context).to_client()


app = ClientApp(
    client_fn=_client_fn, mods=[simulated_dropout_mod, budget_refusal_mod, secaggplus_mod]
)
