"""A deployed node's DP noise cannot be chosen or replayed by the coordinator's seed."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context, RecordDict

from client.app import train_local_model
from fedmodel.config import RunConfig
from fedmodel.data import TabularData
from fedmodel.models import build_model
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
