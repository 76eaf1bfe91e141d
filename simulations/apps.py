"""The simulation's ServerApp and ClientApps: the production wiring, with the scenario's data.

The harness decides the data, not the roles: the ServerApp here passes the run's task
and its test set to the one wiring every run uses (server.wiring.run_federation), and
the ClientApps train each simulated client on the task's rows for its partition with the production
train handlers (client.app, client.secagg_app), wrapped in the harness's own mods:
simulated Byzantine attacks and SecAgg+ dropouts (and, for one test, a dump of each
SecAgg+ client's plaintext model). The engines run these apps
(simulations/runner.py, simulations/local_engine.py); deployed nodes never do.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import NDArrays
from flwr.serverapp import Grid, ServerApp

from client.app import train_handler
from client.distributed_dp_mod import distributed_dp_mod
from client.local_data import ClientRows
from client.secagg_app import secagg_client_app as build_secagg_client_app
from fedmodel.config import RunConfig
from fedmodel.data import row_count
from fedmodel.protocol import PARTITION_ID_KEY
from fedmodel.task import Site, client_datasets
from fedmodel.task_loading import load_task
from server.wiring import CentralEvaluation, run_federation
from simulations.attacks import simulated_attack_mod
from simulations.dropouts import simulated_dropout_mod

# Test only: a directory where each simulated SecAgg+ client writes its plaintext model,
# so a test can compute plain FedAvg of the survivors. Never set it for a real run.
UPDATE_DUMP_VARIABLE = "FEDMODEL_TEST_SECAGG_UPDATE_DIR"
# Test only: where each simulated distributed-DP client writes its plaintext update, its
# residues and its masked vector (what the coordinator receives). Never for a real run.
ENCODING_DUMP_VARIABLE = "FEDMODEL_TEST_DISTRIBUTED_DP_DIR"

server_app = ServerApp()


@server_app.main()
def simulate_federation(grid: Grid, context: Context) -> None:
    """Run the scenario's federation, scored on its test set; files land in output-dir."""
    config = RunConfig.from_run_config(context.run_config)
    task = load_task(config)
    # SecAgg+ divides weights by the largest client's size: the harness knows it
    sizes = client_datasets(task, config.clients, config.seed) if config.secagg else None
    largest = max(map(row_count, sizes)) if sizes is not None else None
    run_federation(
        grid, context, config, CentralEvaluation(task, task.test_data(config.seed)), largest
    )


def partition(config: RunConfig, partition_id: int) -> ClientRows:
    """A simulated client's training rows: the task's data for its partition id."""
    task = load_task(config)
    site = Site(partition_id, config.clients, config.seed)
    return ClientRows(partition_id, task.train_data(site), task)


def partition_rows(context: Context, msg: Message) -> ClientRows:
    """The rows of the simulated client `context` is (the engine says which)."""
    partition_id = int(str(context.node_config[PARTITION_ID_KEY]))
    return partition(RunConfig.from_run_config(context.run_config), partition_id)


client_app = ClientApp(mods=[simulated_attack_mod])
client_app.train()(train_handler(partition_rows))


def dump_update_for_tests(
    partition_id: int, server_round: int, arrays: NDArrays, num_examples: int
) -> None:
    """Write a SecAgg+ client's plaintext model where `UPDATE_DUMP_VARIABLE` says, if set."""
    directory = os.environ.get(UPDATE_DUMP_VARIABLE)
    if directory:
        path = Path(directory) / f"round-{server_round}-client-{partition_id}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, *arrays, num_examples=num_examples)


secagg_client_app = build_secagg_client_app(
    partition, mods=[simulated_dropout_mod], observe=dump_update_for_tests
)


def dump_encoding_for_tests(
    partition_id: int,
    server_round: int,
    update: np.ndarray,
    residues: np.ndarray,
    masked: np.ndarray,
) -> None:
    """Write a distributed-DP client's update, residues and masked vector, if asked to."""
    directory = os.environ.get(ENCODING_DUMP_VARIABLE)
    if directory:
        path = Path(directory) / f"round-{server_round}-client-{partition_id}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, update=update, residues=residues, masked=masked)


distributed_dp_client_app = build_secagg_client_app(
    partition,
    mods=[simulated_dropout_mod],
    masking=distributed_dp_mod(dump_encoding_for_tests),
)
