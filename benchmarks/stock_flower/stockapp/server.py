"""Stock ServerApp: FedAvg over sampled clients and a central evaluation each round."""

from __future__ import annotations

import time
from logging import INFO

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from stockapp.task import Net, load_data

ROUND_MARKER = "stock-round-done "
TEST_SEED = 2**31 - 1

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    features = int(config["num-features"])
    model = Net(features)
    test = load_data(TEST_SEED, features, 10_000, 10_000)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            x, y = next(iter(test))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        log(INFO, "%s%d %.6f", ROUND_MARKER, server_round, time.time())
        return MetricRecord({"loss": float(loss)})

    num_nodes = int(config["num-nodes"])
    fraction = float(config["fraction-train"])
    FedAvg(
        fraction_train=fraction,
        fraction_evaluate=0.0,
        min_train_nodes=max(1, int(num_nodes * fraction)),
        min_available_nodes=num_nodes,
    ).start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(config["num-rounds"]),
        evaluate_fn=evaluate,
    )
