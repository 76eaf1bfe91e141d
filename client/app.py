"""ClientApp: local DP-SGD training on this client's data, within its owner's budget.

The noise multiplier is calibrated once per run for the client's whole planned
participation (rounds x local epochs). What the client has spent lives in its owner's
privacy ledger (fedmodel.privacy.ledger), keyed by the dataset's fingerprint, so epsilon
composes across rounds, runs and restarts; before training, the client refuses any
round that would take it past the owner's budget (fedmodel.privacy.budget).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client.ledger_guard import ledger_run_id
from client.local_data import (
    ClientRows,
    Metrics,
    describe_local_data,
    evaluate_local_data,
    holdout_metrics,
    is_deployed,
    local_training_rows,
)
from fedmodel.config import RunConfig
from fedmodel.data import dataset_tensors, make_loader, row_count
from fedmodel.errors import ConfigError
from fedmodel.privacy.accountant import epsilon_of, history_fields
from fedmodel.privacy.budget import (
    BUDGET_EXHAUSTED_CODE,
    BudgetExhausted,
    OwnerBudget,
    new_segments,
)
from fedmodel.privacy.calibration import calibrate_noise_multiplier
from fedmodel.privacy.distributed_accounting import DistributedRelease, owner_segment
from fedmodel.privacy.distributed_dp import DistributedDpParameters
from fedmodel.privacy.distributed_ledger import owner_release_json
from fedmodel.privacy.ledger import NODE_BUDGET, PrivacyLedger, dataset_fingerprint
from fedmodel.privacy.signing import LedgerSigner
from fedmodel.protocol import (
    ARRAYS_KEY,
    BUDGET_KEYS,
    CONFIG_KEY,
    DELTA_KEY,
    EPSILON_KEY,
    EVALUATION_PREFIX,
    LEDGER_PATH_KEY,
    METRICS_KEY,
    NOISE_SHARES_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
    TRAIN_LOSS_KEY,
)
from fedmodel.run_directory import LEDGERS_DIR
from fedmodel.sampling import client_batch_size, poisson_plan
from fedmodel.training import TrainResult, select_device, train_dp, train_plain

TrainMetrics = Metrics

TrainingRows = Callable[[Context, Message], ClientRows]


def train_handler(training_rows: TrainingRows) -> ClientAppCallable:
    """The train step of a ClientApp that trains on the rows `training_rows` gives it.

    One handler for every ClientApp: this module's `app` (what a deployed node runs)
    reads the node's own file; the simulation harness (simulations/apps.py) passes its
    scenario's partitions and adds its own mods around the same handler.
    """

    def train(msg: Message, context: Context) -> Message:
        """Train the received global model on this client's rows and reply with it."""
        config = RunConfig.from_run_config(context.run_config)
        rows = training_rows(context, msg)
        round_config = msg.content.config_records[CONFIG_KEY]
        server_round = int(str(round_config[SERVER_ROUND_KEY]))
        proximal_mu = float(str(round_config.get("proximal-mu", 0.0)))  # sent by FedProx
        global_state = msg.content.array_records[ARRAYS_KEY].to_torch_state_dict()
        evaluation: TrainMetrics = {}
        if is_deployed(context):  # score what was received first: no evaluate message needed
            scores = holdout_metrics(round_config, context, global_state)
            evaluation = {EVALUATION_PREFIX + key: value for key, value in scores.items()}
        try:
            state, metrics = train_local_model(
                config, context, rows, global_state, server_round, proximal_mu
            )
        except BudgetExhausted as refusal:
            return Message(error=Error(BUDGET_EXHAUSTED_CODE, str(refusal)), reply_to=msg)
        content = RecordDict(
            {ARRAYS_KEY: ArrayRecord(state), METRICS_KEY: MetricRecord(metrics | evaluation)}
        )
        return Message(content=content, reply_to=msg)

    return train


# A deployed node's ClientApp: it describes its own file (query), trains on it and scores
# global models on its held-out rows (evaluate). No simulation hook is installed here.
app = ClientApp()
app.query()(describe_local_data)
app.evaluate()(evaluate_local_data)
app.train()(train_handler(local_training_rows))


def train_local_model(
    config: RunConfig,
    context: Context,
    rows: ClientRows,
    global_state: dict[str, torch.Tensor],
    server_round: int,
    proximal_mu: float = 0.0,
) -> tuple[dict[str, torch.Tensor], TrainMetrics]:
    """One round of local training: DP-SGD within the owner's budget (unless --no-dp).

    Shared by this ClientApp and the SecAgg+ one (client/secagg_app.py). Raises
    BudgetExhausted, before any training, when the round would overspend.
    """
    torch.set_num_threads(1)  # one core per simulated client; more oversubscribes the box
    partition_id, data = rows.index, rows.data
    seed = round_seed(config, context, partition_id, server_round)  # DP noise, batches

    device = select_device(config.device)
    model = rows.task.model()
    model.load_state_dict(global_state)
    model.to(device)  # model and data move to the device once per call
    # a small client takes smaller batches (fedmodel.sampling.client_batch_size)
    loader = make_loader(data, client_batch_size(row_count(data), config.batch_size), seed, device)
    metrics: TrainMetrics = {NUM_EXAMPLES_KEY: row_count(data), PARTITION_ID_KEY: partition_id}
    if config.sample_dp:
        result, budget = _train_private(
            model, rows, loader, config, context, server_round, proximal_mu, device, seed
        )
        # at the owner's delta: a deployed node never accounts at the coordinator's
        epsilon = epsilon_of(result.history, budget.delta)
        metrics |= history_fields(result.history)
        metrics |= {EPSILON_KEY: epsilon, DELTA_KEY: budget.delta}
        metrics |= _budget_metrics(result, budget)
    else:
        result = train_plain(
            model, rows.task.loss, loader, config.local_epochs, config.lr, device, proximal_mu
        )
    metrics[TRAIN_LOSS_KEY] = result.loss
    model.to("cpu")
    return model.state_dict(), metrics


def round_seed(config: RunConfig, context: Context, partition_id: int, server_round: int) -> int:
    """The seed of a round's DP noise and Poisson sampling.

    Only a simulated node (node config `partition-id`, which the simulation engine sets
    and a deployed owner's node config does not carry) follows the run config's seed, so
    that simulations reproduce. A deployed node draws a fresh seed from the OS CSPRNG
    (`secrets`) every round: the coordinator can neither choose nor predict its noise.
    The stream itself is torch's generator, not a CSPRNG (Opacus's secure mode needs
    torchcsprng, which has no torch 2.x build).
    """
    if PARTITION_ID_KEY in context.node_config:
        return config.seed * 1_000_003 + partition_id * 1_009 + server_round
    return secrets.randbits(63)


def _train_private(
    model: torch.nn.Module,
    rows: ClientRows,
    loader: torch.utils.data.DataLoader,
    config: RunConfig,
    context: Context,
    server_round: int,
    proximal_mu: float,
    device: torch.device,
    seed: int,
) -> tuple[TrainResult, OwnerBudget]:
    """Project, write ahead, train, commit: the ledger protocol of one round.

    Raises BudgetExhausted (before any training) when the round would overspend; the
    returned history is everything ever spent on this dataset, this round included.
    """
    ledger = PrivacyLedger(ledger_path(config, context), ledger_signer(context))
    # a deployed node's data all spend one budget; a simulated client's, its partition's
    fingerprint = (
        NODE_BUDGET
        if is_deployed(context)
        else dataset_fingerprint(*(tensor.numpy() for tensor in dataset_tensors(rows.data)))
    )
    budget = owner_budget(config, context)
    run_id = ledger_run_id(config, context.run_id)
    assert loader.batch_size is not None  # make_loader sets one: a small client's own
    plan = poisson_plan(row_count(rows.data), loader.batch_size)  # what the sampler runs
    sample_rate, steps = plan.sample_rate, config.local_epochs * plan.steps_per_epoch
    with ledger:  # one connection for the round's ledger steps
        noise_multiplier = ledger.run_noise_multiplier(fingerprint, run_id)
        if noise_multiplier is None:
            noise_multiplier = calibrate_noise_multiplier(
                config.epsilon, config.delta, sample_rate, config.rounds * steps
            )
        planned = (noise_multiplier, sample_rate, steps)
        pending, before = ledger.write_ahead(
            fingerprint, run_id, server_round, planned, config.max_grad_norm,
            budget.delta, budget.epsilon, budget.projector(planned),
        )  # fmt: skip
        result = train_dp(
            model,
            rows.task.loss,
            loader,
            config.local_epochs,
            config.lr,
            noise_multiplier,
            config.max_grad_norm,
            before,
            device,
            proximal_mu,
            rows.task.grad_sample_mode,
            seed=seed,
        )
        (used,) = new_segments(before, result.history)
        ledger.commit(pending, used, epsilon_of(result.history, budget.delta))
    return result, budget


def charge_distributed_round(
    config: RunConfig, context: Context, parameters: DistributedDpParameters, server_round: int
) -> float:
    """Charge a deployed owner's budget for one distributed-DP round, before its noisy
    update leaves the node; returns the owner's epsilon after it.

    The charge counts only the noise shares the owner's policy trusts (node config
    `distributed-noise-shares`, set from it by the executor), never the coordinator's
    cohort (fedmodel.privacy.distributed_accounting.owner_segment), so a coordinator
    asking for round after round stops at the owner's budget as DP-SGD rounds do. Raises
    BudgetExhausted, writing nothing, when the round would overspend.
    """
    shares = int(str(context.node_config.get(NOISE_SHARES_KEY, 1)))
    planned = owner_segment(parameters, shares)
    budget = owner_budget(config, context)
    run_id = ledger_run_id(config, context.run_id)
    release = owner_release_json(DistributedRelease(server_round, parameters, shares))
    with PrivacyLedger(ledger_path(config, context), ledger_signer(context)) as ledger:
        pending, before = ledger.write_ahead(
            NODE_BUDGET, run_id, server_round, planned, parameters.clip_norm,
            budget.delta, budget.epsilon, budget.projector(planned), release,
        )  # fmt: skip
        epsilon = epsilon_of([*before, planned], budget.delta)
        ledger.commit(pending, planned, epsilon)
    return epsilon


def ledger_path(config: RunConfig, context: Context) -> Path:
    """Node config `ledger-path` (a deployed owner), else one file per simulated client."""
    if LEDGER_PATH_KEY in context.node_config:
        return Path(str(context.node_config[LEDGER_PATH_KEY])).expanduser()
    if PARTITION_ID_KEY not in context.node_config:
        raise ConfigError("this node has no privacy ledger: set node config 'ledger-path'")
    directory = Path(config.ledger_dir or Path(config.output_dir) / LEDGERS_DIR)
    return directory / f"client-{int(str(context.node_config[PARTITION_ID_KEY]))}.sqlite"


def ledger_signer(context: Context) -> LedgerSigner | None:
    """The node key that signs ledger entries: node config `node-key-path`, else a
    `node.key` beside the ledger (where `fedmodel client init` puts it); none in simulation.
    """
    node = context.node_config
    if "node-key-path" in node:
        return LedgerSigner(Path(str(node["node-key-path"])).expanduser())
    if LEDGER_PATH_KEY in node:
        beside = Path(str(node[LEDGER_PATH_KEY])).expanduser().parent / "node.key"
        if beside.is_file():
            return LedgerSigner(beside)
    return None


def owner_budget(config: RunConfig, context: Context) -> OwnerBudget:
    """The data owner's budget: node config `budget-epsilon`/`budget-delta` when set.

    In simulation the run config stands in for every owner: `budget-epsilon`, or the
    run's `epsilon` when that is 0.
    """
    node = context.node_config
    epsilon = float(str(node.get("budget-epsilon", config.budget_epsilon or config.epsilon)))
    delta = float(str(node.get("budget-delta", config.delta)))
    return OwnerBudget(epsilon=epsilon, delta=delta)


def _budget_metrics(result: TrainResult, budget: OwnerBudget) -> dict[str, float]:
    assert budget.epsilon is not None
    spent = epsilon_of(result.history, budget.delta)
    left = max(budget.epsilon - spent, 0.0)
    return dict(zip(BUDGET_KEYS, (budget.epsilon, budget.delta, left), strict=True))
