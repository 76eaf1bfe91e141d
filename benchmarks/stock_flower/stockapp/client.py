"""Stock ClientApp: a new PrivacyEngine per call and get_epsilon every call, as Flower's
Opacus example does (flower/examples/opacus)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from opacus import PrivacyEngine

from stockapp.task import Net, load_data

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    config = context.run_config
    features = int(config["num-features"])
    partition_id = int(context.node_config["partition-id"])
    loader = load_data(
        partition_id, features, int(config["rows-per-client"]), int(config["batch-size"])
    )
    model = Net(features)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
    privacy_engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=float(config["noise-multiplier"]),
        max_grad_norm=float(config["max-grad-norm"]),
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    total, batches = 0.0, 0
    for x, y in loader:
        if len(x) == 0:
            continue
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        total, batches = total + float(loss), batches + 1
    epsilon = privacy_engine.get_epsilon(delta=float(config["delta"]))
    metrics = MetricRecord(
        {
            "num-examples": len(loader.dataset),  # type: ignore[arg-type]
            "train-loss": total / max(batches, 1),
            "epsilon": epsilon,
        }
    )
    arrays = ArrayRecord(model._module.state_dict())
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
