"""A deployed node's DP noise cannot be chosen or replayed by the coordinator's seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, RecordDict

from client.app import train_local_model
from client.distributed_dp_mod import noise_seed
from fedmodel.config import RunConfig
from fedmodel.data import TabularData
from fedmodel.distributed_secagg import distributed_parameters
from fedmodel.models import build_model
from fedmodel.privacy.distributed_dp import encode
from fedmodel.sampling import dp_numpy_generator
from tests.conftest import table_rows


def _train(config: RunConfig, node: dict[str, str | int | float], data: TabularData) -> list:
    context = Context(
        run_id=7, node_id=1, node_config=node, state=RecordDict(),
        run_config=dict(config.to_run_config()),
    )  # fmt: skip
    torch.manual_seed(0)
    start = build_model(config.model, data.num_features).state_dict()
    state, metrics = train_local_model(
        config, context, table_rows(config, data), start, server_round=1
    )
    assert metrics["epsilon"] > 0  # DP-SGD ran and was charged
    return [tensor.clone() for tensor in state.values()]


def test_simulated_nodes_follow_the_run_seed_and_deployed_nodes_do_not(
    tmp_path: Path, flchain: tuple[TabularData, TabularData]
) -> None:
    train, _ = flchain
    data = train.subset(torch.arange(400).numpy())
    config = RunConfig(seed=3, epsilon=1.0, batch_size=40, device="cpu")

    def run(name: str, node: dict[str, str | int | float]) -> list:
        return _train(config.replace(output_dir=str(tmp_path / name)), node, data)

    simulated = [run(f"sim-{n}", {"partition-id": 0}) for n in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*simulated, strict=True))  # reproducible
    deployed = [
        run(f"node-{n}", {"ledger-path": str(tmp_path / f"node-{n}.sqlite"), "budget-epsilon": 5})
        for n in range(2)
    ]
    # the same request, the same run seed, the same data: different noise every time
    assert not any(torch.equal(a, b) for a, b in zip(*deployed, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(simulated[0], deployed[0], strict=True))


def test_a_deployed_nodes_distributed_noise_ignores_the_run_seed() -> None:
    """Under --dp distributed, the residues a node masks carry its own noise: the same
    update, run config and (public) rotation seed give the same residues on a simulated
    client, and different ones on a deployed node, each time."""
    config = RunConfig(dp="distributed", seed=3)
    update = np.random.default_rng(0).normal(0.0, 0.01, 300)
    parameters = distributed_parameters(config, update.size)

    def residues(node: dict[str, str | int | float]) -> np.ndarray:
        context = Context(
            run_id=7, node_id=1, node_config=node, state=RecordDict(),
            run_config=dict(config.to_run_config()),
        )  # fmt: skip
        seed = noise_seed(config, context, int(str(node.get("partition-id", -1))), 1)
        return encode(update, parameters, 11, dp_numpy_generator(seed))

    simulated = [residues({"partition-id": 0}) for _ in range(2)]
    np.testing.assert_array_equal(*simulated)
    deployed = [residues({"ledger-path": "unused.sqlite"}) for _ in range(2)]
    assert not np.array_equal(*deployed)
    assert not np.array_equal(simulated[0], deployed[0])
