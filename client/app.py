"""ClientApp: local DP-SGD training on this client's data, with cross-round accounting.

The noise multiplier is calibrated once for the client's whole planned participation
(rounds x local epochs), and the accountant's history is restored every round so that
epsilon composes across rounds. For now the history lives in `context.state`, which
Flower keeps in SuperNode memory for the length of one run.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmodel.config import RunConfig
from fedmodel.data import make_loader
from fedmodel.models import build_model
from fedmodel.privacy.accountant import (
    Segment,
    calibrate_noise_multiplier,
    epsilon_of,
    history_fields,
    history_from_fields,
)
from fedmodel.training import TrainResult, select_device, train_dp, train_plain
from simulations.scenarios import client_partitions

PRIVACY_STATE_KEY = "privacy"

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's partition and reply with it."""
    torch.set_num_threads(1)  # one core per simulated client; more oversubscribes the box
    config = RunConfig.from_run_config(context.run_config)
    partition_id = int(str(context.node_config["partition-id"]))
    data = client_partitions(config)[partition_id]
    server_round = int(str(msg.content.config_records["config"]["server-round"]))
    seed = config.seed * 1_000_003 + partition_id * 1_009 + server_round
    torch.manual_seed(seed)

    model = build_model(config.model, data.num_features)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    loader = make_loader(data, config.batch_size, seed)
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": len(data),
        "partition-id": partition_id,
    }
    if config.dp:
        result = _train_private(model, loader, config, context)
        metrics |= history_fields(result.history)
        metrics |= {"epsilon": epsilon_of(result.history, config.delta), "delta": config.delta}
    else:
        result = train_plain(model, loader, config.local_epochs, config.lr, select_device())
    metrics["train-loss"] = result.loss
    model.to("cpu")
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


def _train_private(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    config: RunConfig,
    context: Context,
) -> TrainResult:
    sample_rate = 1.0 / len(loader)  # exactly the rate Opacus's Poisson sampler uses
    state = context.state.config_records.get(PRIVACY_STATE_KEY)
    if state is None:
        planned_steps = config.rounds * config.local_epochs * len(loader)
        noise_multiplier = calibrate_noise_multiplier(
            config.epsilon, config.delta, sample_rate, planned_steps
        )
        history: list[Segment] = []
    else:
        noise_multiplier = float(state["noise-multiplier"])  # type: ignore[arg-type]
        history = history_from_fields(state)
    result = train_dp(
        model,
        loader,
        config.local_epochs,
        config.lr,
        noise_multiplier,
        config.max_grad_norm,
        history,
        select_device(),
    )
    context.state[PRIVACY_STATE_KEY] = ConfigRecord(
        {"noise-multiplier": noise_multiplier, **history_fields(result.history)}
    )
    return result
