"""The keys of a run: each one's default, section and one-line help, declared once.

`RunConfig` (run_config.py) adds validation and the Flower run-config form; the CLI
generates its options from these declarations (fedmodel/cli/options.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmodel import __version__
from fedmodel.config.keys import (
    MODEL_USES,
    AggregatorName,
    AttackName,
    DpMode,
    EvaluationMethod,
    ModelName,
    PartitionScheme,
    Section,
    Task,
    key,
)

_DATA, _FEDERATION, _TRAINING = Section.DATA, Section.FEDERATION, Section.TRAINING
_PRIVACY, _CLIENT_DP, _ROBUSTNESS = Section.PRIVACY, Section.CLIENT_DP, Section.ROBUSTNESS
_SECAGG, _ENGINE, _OUTPUT, _RUN = Section.SECAGG, Section.ENGINE, Section.OUTPUT, Section.RUN
_DISTRIBUTED_DP = Section.DISTRIBUTED_DP


TABULAR_TASK = "fedmodel-tabular"
"""The built-in task: a registered model on table rows (fedmodel/table_task.py)."""
TASK_ENTRY_POINTS = "fedmodel.tasks"
"""The packaging entry-point group a pip-installed task registers under (docs/tasks.md)."""


@dataclass(frozen=True)
class RunKeys:
    """The fields of `RunConfig`, flat (`config.epsilon`) because every role reads them.

    Their sections (data, federation, training, privacy, ...) are declared once, in each
    field's `key(...)`, not by nesting; choice fields are `Literal`s.
    """

    scenario: str = key("medical", _RUN, "Scenario simulated (simulate's sub-command).")
    dataset: str = key("flchain", _DATA, "Dataset of the scenario.")
    clients: int = key(
        8,
        _FEDERATION,
        "Number of clients. Datasets split by natural sites (covid-clinics, lending-club, "
        "csv --partition-by) fix it themselves.",
    )
    rounds: int = key(5, _FEDERATION, "Federated rounds.")
    local_epochs: int = key(1, _TRAINING, "Local epochs per round.")
    batch_size: int = key(64, _TRAINING, "Expected batch size (Poisson sampling).")
    lr: float = key(0.5, _TRAINING, "Local SGD learning rate.")
    dp: DpMode = key(
        "sample",
        _PRIVACY,
        "sample: DP-SGD on each client (protects records); client: the server clips and "
        "noises client updates (protects whole clients); both; distributed: each client "
        "clips and noises its update under SecAgg+ (whole clients, from the server too); off.",
    )
    epsilon: float = key(1.0, _PRIVACY, "Privacy budget of each client for this run.")
    delta: float = key(1e-5, _PRIVACY, "DP delta of each client (below 1/records).")
    max_grad_norm: float = key(1.0, _PRIVACY, "Per-sample gradient clipping norm.")
    partition: PartitionScheme = key(
        "iid",
        _DATA,
        "iid, dirichlet (label skew, see --alpha), shard (label shards) or pathological.",
    )
    alpha: float = key(0.5, _DATA, "Dirichlet concentration (smaller = more skewed).")
    seed: int = key(0, _TRAINING, "Seed for partitioning, generation and training.")
    model: ModelName = key(
        "mlp", _TRAINING, "; ".join(f"{name} ({use})" for name, use in MODEL_USES.items()) + "."
    )
    output_dir: str = key("runs/flwr-run", _RUN, "Run directory the ServerApp writes.")
    fraction: float = key(
        1.0, _FEDERATION, "Share of clients sampled to train each round (FedAvg)."
    )
    data: str = key("", _DATA, "Your table: a .csv or .parquet file.")
    label: str = key("", _DATA, "The label column: 0/1, yes/no... or classes (--task).")
    partition_by: str = key("", _DATA, "Column naming each row's site: one client per value.")
    task: Task = key(
        "binary",
        _DATA,
        "binary (one logit), multiclass (one per label value) or regression (a number).",
    )
    task_ref: str = key(
        "", _RUN, "simulate task: the Task, as module:attribute or an installed task's name."
    )
    fix_model: bool = key(
        False,
        _TRAINING,
        "Swap layers DP-SGD cannot train (BatchNorm, nn.LSTM...) for DP-compatible ones "
        "(Opacus's ModuleValidator.fix).",
    )
    budget_epsilon: float = key(
        0.0, _PRIVACY, "Each owner's lifetime budget across runs (0: same as --epsilon)."
    )
    ledger_dir: str = key(
        "",
        _PRIVACY,
        "Owners' privacy ledgers; reuse across runs to compose budgets "
        "(default <run dir>/ledgers).",
    )
    min_clients: int = key(
        1,
        _FEDERATION,
        "Clients (deployed: online nodes) that must train each round; fewer end the run cleanly.",
    )
    central_noise: float = key(
        1.0, _CLIENT_DP, "--dp client/both: noise multiplier of each round's release."
    )
    central_clipping_norm: float = key(
        1.0, _CLIENT_DP, "--dp client/both: clip each update to this L2 norm (adaptive: first)."
    )
    central_adaptive: bool = key(
        False,
        _CLIENT_DP,
        "--dp client/both: adapt the clipping norm to a quantile of update norms (Andrew et al.).",
        off_switch="--central-fixed",
    )
    central_target_quantile: float = key(
        0.5, _CLIENT_DP, "Adaptive clipping: share of updates to leave unclipped."
    )
    central_clip_lr: float = key(0.2, _CLIENT_DP, "Adaptive clipping: learning rate of the norm.")
    central_count_stddev: float = key(
        0.0, _CLIENT_DP, "Adaptive clipping: noise on the unclipped count (0: per round / 20)."
    )
    central_epsilon: float = key(
        0.0,
        _CLIENT_DP,
        "--dp client/both: client-level budget; stop before exceeding it (0: none).",
    )
    distributed_clip: float = key(
        1.0, _DISTRIBUTED_DP, "--dp distributed: each client clips its update to this L2 norm."
    )
    distributed_noise: float = key(
        1.0,
        _DISTRIBUTED_DP,
        "--dp distributed: noise multiplier of the sum over the clients per round (each adds "
        "its 1/sqrt(n) share); drop-outs leave less noise, and are accounted.",
    )
    distributed_bits: int = key(
        18, _DISTRIBUTED_DP, "--dp distributed: bits per coordinate SecAgg+ sums (modulus 2**bits)."
    )
    distributed_epsilon: float = key(
        0.0,
        _DISTRIBUTED_DP,
        "--dp distributed: client-level budget; stop before exceeding it (0: none).",
    )
    round_timeout: float = key(
        600.0, _FEDERATION, "Seconds to wait for a round's replies; later ones count as failed."
    )
    federation_dir: str = key(
        "", _RUN, "Deployment: the federation whose registry names the nodes and caps weights."
    )
    evaluation: EvaluationMethod = key(
        "mean",
        _FEDERATION,
        "Deployment: how the nodes' scores combine (mean: weights capped like training's).",
    )
    aggregator: AggregatorName = key("fedavg", _ROBUSTNESS, "Aggregation rule.")
    server_lr: float = key(
        0.1,
        _ROBUSTNESS,
        "--aggregator fedadam: the server optimizer's learning rate (Adam's step size on "
        "the averaged update; Flower's default).",
    )
    server_momentum: float = key(
        0.9,
        _ROBUSTNESS,
        "--aggregator fedavgm: momentum of the server's step, which is the averaged update "
        "plus this times the previous step (McMahan et al. 2018 used 0.9 under DP).",
    )
    byzantine: int = key(0, _ROBUSTNESS, "Malicious clients per round to tolerate.")
    attack: AttackName = key("none", _ROBUSTNESS, "Simulated attack the attackers send.")
    attackers: float = key(0.0, _ROBUSTNESS, "Simulation: fraction of clients that attack.")
    max_update_norm: float = key(
        0.0, _ROBUSTNESS, "Reject updates farther than this from the global model (0: off)."
    )
    validation_fraction: float = key(
        0.0,
        _DATA,
        "Simulation: score on this share of each client's training rows, held out (a "
        "validation split), never on the test set; fedmodel sweep selects on it (0: off).",
    )
    proximal_mu: float = key(
        0.0, _TRAINING, "--aggregator fedprox: weight mu of the proximal term in local training."
    )
    run_uid: str = key("", _RUN, "Stable run id (the ledgers' key), the same across resumes.")
    resume: bool = key(False, _RUN, "Continue from output_dir's last checkpoint.")
    stop_after_round: int = key(
        0, _OUTPUT, "End the run cleanly after this round; continue it with --resume (0: off)."
    )
    save_round_models: bool = key(
        False,
        _OUTPUT,
        "Also write each round's model file (models/round-NNNN/), not only the final one.",
    )
    record_messages: bool = key(
        False, _OUTPUT, "Debug: keep every reply the ServerApp receives (run dir received/)."
    )
    secagg: bool = key(
        False, _SECAGG, "Secure aggregation: the server sees only the sum of updates."
    )
    secagg_shares: int = key(5, _SECAGG, "Key shares per client, itself included (odd, >= 3).")
    secagg_threshold: int = key(
        3, _SECAGG, "Shares that rebuild a key; shares - threshold may drop out."
    )
    secagg_dropouts: int = key(
        0, _SECAGG, "Simulation: clients that fail after sharing their keys."
    )
    device: str = key(
        "auto", _ENGINE, "Where clients train: auto (CUDA when present), cpu, cuda or cuda:N."
    )
    gpus_per_client: float = key(
        0.0, _ENGINE, "--engine ray: share of a GPU reserved for each client (0.25: four per GPU)."
    )
    app_task: str = key(TABULAR_TASK, _RUN, "Installed task the nodes are asked to run.")
    app_task_version: str = key(__version__, _RUN, "Version of that task.")
