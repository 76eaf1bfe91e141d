"""`fedmodel simulate ...`: run a simulated federation and print its privacy report."""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedmodel.cli.server import Aggregator, Byzantine, MaxUpdateNorm
from fedmodel.config import ATTACKS, RunConfig
from fedmodel.errors import ConfigError
from fedmodel.run_directory import CONFIG_FILE, SUMMARY_FILE, RunSummary, write_json_atomic

if TYPE_CHECKING:  # importing the scenarios loads torch: the CLI imports it when it runs
    from fedmodel.datasets.scenarios import Federation

DEFAULTS = RunConfig()
MAX_PRINTED_CLIENTS = 20
console = Console(highlight=False)

simulate_app = typer.Typer(
    help="Simulate a federation on this machine (Flower Simulation Engine).",
    no_args_is_help=True,
)


Clients = Annotated[
    int | None,
    typer.Option(
        help="Number of clients (default 8). Datasets split by natural sites "
        "(covid-clinics, lending-club, csv --partition-by) fix it themselves."
    ),
]
Rounds = Annotated[int, typer.Option(help="Federated rounds.")]
Fraction = Annotated[
    float, typer.Option(help="Share of clients sampled to train each round (FedAvg).")
]
Epsilon = Annotated[float, typer.Option(help="Privacy budget per client for the whole run.")]
Delta = Annotated[float, typer.Option(help="DP delta per client.")]
LocalEpochs = Annotated[int, typer.Option(help="Local epochs per round.")]
BatchSize = Annotated[int, typer.Option(help="Expected batch size (Poisson sampling).")]
Lr = Annotated[float, typer.Option(help="Local SGD learning rate.")]
MaxGradNorm = Annotated[float, typer.Option(help="Per-sample gradient clipping norm.")]
NoDp = Annotated[bool, typer.Option("--no-dp", help="Train without DP (baseline): --dp off.")]
Dp = Annotated[
    str,
    typer.Option(
        help="sample: DP-SGD on each client (protects records); client: the server clips and "
        "noises client updates (protects whole clients); both; off."
    ),
]
CentralNoise = Annotated[
    float, typer.Option(help="--dp client/both: noise multiplier of each round's release.")
]
CentralClippingNorm = Annotated[
    float,
    typer.Option(help="--dp client/both: clip each update to this L2 norm (adaptive: first)."),
]
CentralAdaptive = Annotated[
    bool,
    typer.Option(
        "--central-adaptive/--central-fixed",
        help="--dp client/both: adapt the clipping norm to a quantile of update norms.",
    ),
]
CentralTargetQuantile = Annotated[
    float, typer.Option(help="Adaptive clipping: share of updates to leave unclipped.")
]
CentralClipLr = Annotated[float, typer.Option(help="Adaptive clipping: learning rate of the norm.")]
CentralCountStddev = Annotated[
    float,
    typer.Option(help="Adaptive clipping: noise on the unclipped count (0: clients per round/20)."),
]
CentralEpsilon = Annotated[
    float,
    typer.Option(help="--dp client/both: client-level budget; stop before exceeding it (0: none)."),
]
Partition = Annotated[str, typer.Option(help="How rows are split: iid or dirichlet.")]
Alpha = Annotated[float, typer.Option(help="Dirichlet concentration (smaller = more skewed).")]
Model = Annotated[str, typer.Option(help="Model: mlp or logreg.")]
Seed = Annotated[int, typer.Option(help="Seed for partitioning, generation and training.")]
Output = Annotated[
    Path | None, typer.Option(help="Run directory (default runs/<timestamp>-<scenario>).")
]
Verbose = Annotated[bool, typer.Option(help="Show every Flower and Ray log line.")]
Engine = Annotated[
    str,
    typer.Option(
        help="local: a warm worker pool on this machine (fast); "
        "ray: Flower's Simulation Engine (for Ray clusters)."
    ),
]
Device = Annotated[
    str,
    typer.Option(help="Where clients train: auto (CUDA when present), cpu, cuda or cuda:N."),
]
GpusPerClient = Annotated[
    float,
    typer.Option(
        help="--engine ray: share of a GPU reserved for each client (0.25: four per GPU)."
    ),
]
BaselineSites = Annotated[
    int,
    typer.Option(help="Sites trained alone for the local-only baseline (a fixed sample)."),
]
NoBaselines = Annotated[
    bool, typer.Option("--no-baselines", help="Skip the central and local-only baselines.")
]
Attack = Annotated[str, typer.Option(help=f"Simulated attack: {', '.join(ATTACKS)}.")]
Attackers = Annotated[float, typer.Option(help="Fraction of clients that attack.")]
BudgetEpsilon = Annotated[
    float,
    typer.Option(help="Each owner's lifetime budget across runs (0: same as --epsilon)."),
]
LedgerDir = Annotated[
    str,
    typer.Option(
        help="Owners' privacy ledgers; reuse across runs to compose budgets "
        "(default <run dir>/ledgers)."
    ),
]
MinClients = Annotated[
    int, typer.Option(help="End the run cleanly when fewer clients can still train.")
]


ProximalMu = Annotated[
    float,
    typer.Option(help="--aggregator fedprox: weight mu of the proximal term in local training."),
]
RoundTimeout = Annotated[
    float, typer.Option(help="Seconds to wait for a round's replies; later ones count as failed.")
]
StopAfterRound = Annotated[
    int, typer.Option(help="End the run cleanly after this round; continue it with --resume.")
]
Resume = Annotated[
    Path | None,
    typer.Option(
        help="Continue this run directory from its last checkpoint, with its own config "
        "(training options are ignored; --engine, --verbose, --no-baselines apply)."
    ),
]

Secagg = Annotated[
    bool,
    typer.Option(
        "--secagg", help="Secure aggregation (SecAgg+): the server sees only the sum of updates."
    ),
]
SecaggShares = Annotated[
    int, typer.Option(help="--secagg: key shares per client, itself included (odd, >= 3).")
]
SecaggThreshold = Annotated[
    int,
    typer.Option(help="--secagg: shares that rebuild a key; shares - threshold may drop out."),
]
SecaggDropouts = Annotated[
    int, typer.Option(help="--secagg: simulated clients that fail after sharing their keys.")
]


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
    )


# Every scenario command takes these, in this order; a command may override a default.
COMMON_OPTIONS: tuple[inspect.Parameter, ...] = (
    _option("clients", Clients, None),
    _option("rounds", Rounds, DEFAULTS.rounds),
    _option("fraction", Fraction, DEFAULTS.fraction),
    _option("epsilon", Epsilon, DEFAULTS.epsilon),
    _option("delta", Delta, DEFAULTS.delta),
    _option("local_epochs", LocalEpochs, DEFAULTS.local_epochs),
    _option("batch_size", BatchSize, DEFAULTS.batch_size),
    _option("lr", Lr, DEFAULTS.lr),
    _option("max_grad_norm", MaxGradNorm, DEFAULTS.max_grad_norm),
    _option("dp", Dp, DEFAULTS.dp),
    _option("no_dp", NoDp, False),
    _option("partition", Partition, DEFAULTS.partition),
    _option("alpha", Alpha, DEFAULTS.alpha),
    _option("model", Model, DEFAULTS.model),
    _option("seed", Seed, DEFAULTS.seed),
    _option("output", Output, None),
    _option("verbose", Verbose, False),
    _option("engine", Engine, "local"),
    _option("device", Device, DEFAULTS.device),
    _option("gpus_per_client", GpusPerClient, DEFAULTS.gpus_per_client),
    _option("baseline_sites", BaselineSites, 10),
    _option("no_baselines", NoBaselines, False),
    _option("aggregator", Aggregator, DEFAULTS.aggregator),
    _option("byzantine", Byzantine, DEFAULTS.byzantine),
    _option("attack", Attack, DEFAULTS.attack),
    _option("attackers", Attackers, DEFAULTS.attackers),
    _option("max_update_norm", MaxUpdateNorm, DEFAULTS.max_update_norm),
    _option("secagg", Secagg, DEFAULTS.secagg),
    _option("secagg_shares", SecaggShares, DEFAULTS.secagg_shares),
    _option("secagg_threshold", SecaggThreshold, DEFAULTS.secagg_threshold),
    _option("secagg_dropouts", SecaggDropouts, DEFAULTS.secagg_dropouts),
    _option("budget_epsilon", BudgetEpsilon, DEFAULTS.budget_epsilon),
    _option("ledger_dir", LedgerDir, DEFAULTS.ledger_dir),
    _option("min_clients", MinClients, DEFAULTS.min_clients),
    _option("central_noise", CentralNoise, DEFAULTS.central_noise),
    _option("central_clipping_norm", CentralClippingNorm, DEFAULTS.central_clipping_norm),
    _option("central_adaptive", CentralAdaptive, DEFAULTS.central_adaptive),
    _option("central_target_quantile", CentralTargetQuantile, DEFAULTS.central_target_quantile),
    _option("central_clip_lr", CentralClipLr, DEFAULTS.central_clip_lr),
    _option("central_count_stddev", CentralCountStddev, DEFAULTS.central_count_stddev),
    _option("central_epsilon", CentralEpsilon, DEFAULTS.central_epsilon),
    _option("proximal_mu", ProximalMu, DEFAULTS.proximal_mu),
    _option("round_timeout", RoundTimeout, DEFAULTS.round_timeout),
    _option("stop_after_round", StopAfterRound, DEFAULTS.stop_after_round),
    _option("resume", Resume, None),
)

OptionsHook = Callable[[dict[str, Any]], dict[str, Any]]


def _scenario_command(
    scenario: str,
    summary: str,
    own_options: Sequence[inspect.Parameter] = (),
    prepare: OptionsHook = lambda options: options,
) -> None:
    """Register `fedmodel simulate <scenario>`: its own options first, then the common ones.

    An own option named like a common one replaces it (another default or help text).
    `prepare` turns the parsed options into RunConfig fields (e.g. a path made absolute).
    """
    own = {parameter.name for parameter in own_options}
    parameters = [*own_options, *(p for p in COMMON_OPTIONS if p.name not in own)]

    def command(**options: Any) -> None:
        _run(scenario, prepare(options))

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__doc__ = summary
    command.__name__ = f"simulate_{scenario}"
    simulate_app.command(scenario)(command)


def _prepare_csv(options: dict[str, Any]) -> dict[str, Any]:
    data: Path = options["data"]
    return options | {
        "data": str(data.absolute()),
        "dataset": data.name,
        "partition_by": options["partition_by"] or "",
    }


_scenario_command(
    "medical",
    "Hospitals train a risk model under DP-SGD (default: flchain mortality).",
    [
        _option(
            "dataset",
            Annotated[
                str, typer.Option(help="flchain, covid-clinics, breast-cancer or synthetic-ehr.")
            ],
            "flchain",
        )
    ],
)
_scenario_command(
    "financial",
    "Banks train a credit-risk or fraud model under DP-SGD (default: lending-club).",
    [
        _option(
            "dataset",
            Annotated[str, typer.Option(help="lending-club, credit-default or synthetic-fraud.")],
            "lending-club",
        )
    ],
)
_scenario_command(
    "digits",
    "Devices train a small CNN on 5,000 real MNIST digits (10 classes) under DP-SGD.",
    [
        _option("lr", Lr, 0.1),
        _option(
            "partition",
            Annotated[
                str,
                typer.Option(help="iid, dirichlet, shard (2 label shards each) or pathological."),
            ],
            "shard",
        ),
        _option(
            "model",
            Annotated[str, typer.Option(help="Model (cnn: Conv 32-64-64 + Dense 64).")],
            "cnn",
        ),
    ],
    lambda options: options | {"dataset": "mnist-5k"},
)
_scenario_command(
    "csv",
    "Simulate a federation on your own table (one client per --partition-by value).",
    [
        _option(
            "data", Annotated[Path, typer.Option(help="Your table: a .csv or .parquet file.")], ...
        ),
        _option(
            "label",
            Annotated[
                str,
                typer.Option(help="The label column: 0/1, yes/no... or classes (--task)."),
            ],
            ...,
        ),
        _option(
            "task",
            Annotated[
                str,
                typer.Option(help="binary (one logit) or multiclass (one per label value)."),
            ],
            DEFAULTS.task,
        ),
        _option(
            "partition_by",
            Annotated[
                str | None,
                typer.Option(help="Column naming each row's site: one client per value."),
            ],
            None,
        ),
    ],
    _prepare_csv,
)


def _run(scenario: str, options: dict[str, Any]) -> None:
    """Build the RunConfig from a command's options (named like its fields) and simulate."""
    options = dict(options)
    output, verbose = options.pop("output"), options.pop("verbose")
    engine = options.pop("engine")
    baseline_sites, no_baselines = options.pop("baseline_sites"), options.pop("no_baselines")
    clients_given = options["clients"] is not None
    options["clients"] = options["clients"] or DEFAULTS.clients
    if options.pop("no_dp"):
        if options["dp"] not in (DEFAULTS.dp, "off"):
            raise ConfigError(
                f"--no-dp means --dp off; drop one of --no-dp and --dp {options['dp']}"
            )
        options["dp"] = "off"
    resume = options.pop("resume")
    if resume is not None:
        from server.resume import resume_config

        config = resume_config(resume, scenario)
        output, clients_given = resume, True
    else:
        config = RunConfig(scenario=scenario, run_uid=uuid.uuid4().hex, **options)
    _simulate(
        config, clients_given, output, verbose, None if no_baselines else baseline_sites, engine
    )


def _simulate(
    config: RunConfig,
    clients_given: bool,
    output: Path | None,
    verbose: bool,
    baseline_sites: int | None,
    engine: str = "local",
) -> None:
    from simulations.runner import ENGINES, progress_line, started_engine

    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)} (got {engine!r})")
    run_dir = output or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.scenario}"
    if not config.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run directory {run_dir} already exists and is not empty; pass another --output"
        )
    # The engine starts first: its workers import torch and Opacus while this process
    # imports, loads and summarises the data (two cores busy instead of one).
    per_round = None if config.sites_from_data else config.clients_per_round
    with started_engine(config, run_dir, engine, per_round) as run_on_engine:
        from fedmodel.datasets.scenarios import MIN_DP_ROWS, federation, resolve_clients
        from fedmodel.models import build_model
        from server.aggregators import check_aggregator
        from simulations.heterogeneity import heterogeneity
        from simulations.runner import check_device

        check_device(config)  # a GPU that is not there: say so before loading any data
        with console.status("Loading data and partitioning it across clients..."):
            config = resolve_clients(config, clients_given)
            clients = federation(config)
            build_model(config.model, clients.test.num_features, clients.test.num_classes)
            check_aggregator(config.aggregator, config.clients_per_round, config.byzantine)
            non_iid = heterogeneity(clients.clients)
        config = config.replace(  # the engine runs elsewhere: paths must be absolute
            output_dir=str(run_dir.absolute()),
            ledger_dir=str(Path(config.ledger_dir).absolute()) if config.ledger_dir else "",
        )
        if not config.resume:  # a resumed run keeps the config.json it started with
            write_json_atomic(run_dir / CONFIG_FILE, {**config.to_run_config()})
        _announce(config, clients, run_dir)
        started = time.monotonic()
        status = console.status(
            "Starting Flower's simulation engine (takes ~20 s)..."
            if engine == "ray"
            else "Starting the simulation workers (takes a few seconds)..."
        )
        status.start()

        def show_progress(row: dict[str, Any]) -> None:
            status.update(f"Training round {row['round'] + 1}/{row['rounds']}...")
            measures = (
                f"AUROC {_number(row['auroc'])}  AUPRC {_number(row.get('auprc'))}  "
                f"accuracy {row['accuracy']:.4f}"
            )
            console.print(progress_line(row, measures, time.monotonic() - started))

        try:
            summary = run_on_engine(
                config, show_progress, (lambda line: console.out(line)) if verbose else None
            )
        finally:
            status.stop()
    from simulations.baselines import run_baselines
    from simulations.report import write_report

    summary = replace(
        summary,
        seconds=round(time.monotonic() - started, 1),
        federation={
            "natural_sites": clients.natural_sites,
            "too_small_to_train": list(clients.too_small),
            "min_dp_rows": MIN_DP_ROWS,
            "site_names": list(clients.site_names),
            "achievable_auroc": clients.achievable_auroc,
            "fraction": config.fraction,
        },
        heterogeneity=non_iid,
    )
    if baseline_sites is not None:
        with console.status("Training baselines (central, central DP, each site alone)..."):
            baselines = run_baselines(
                config, clients.clients, clients.test, summary.final_metrics, baseline_sites
            )
        summary = replace(summary, baselines=baselines)
    summary.save(run_dir)
    report = write_report(run_dir, summary)
    _print_summary(summary, run_dir, report)
    if summary.stopped_early:
        console.print(f"Stopped early: {summary.stopped_early}")


def _announce(config: RunConfig, clients: Federation, run_dir: Path) -> None:
    """What is about to run: the federation, the privacy settings, where results go."""
    from fedmodel.datasets.scenarios import MIN_DP_ROWS

    if clients.natural_sites is not None:
        console.print(
            f"{config.dataset}: {clients.natural_sites} natural sites; "
            f"{len(clients.too_small)} have fewer than {MIN_DP_ROWS} training rows, too few "
            f"to train under DP, and sit out; {config.clients} train"
        )
    console.print(
        f"Simulating {config.clients} {config.scenario} clients ({config.dataset}) for "
        f"{config.rounds} rounds "
        + (
            f"under DP-SGD (epsilon {config.epsilon}, delta {config.delta:g})"
            if config.sample_dp
            else "without DP-SGD"
        )
        + (
            f", client-level DP on the server (noise {config.central_noise:g}, "
            + ("adaptive" if config.central_adaptive else "fixed")
            + f" clipping from {config.central_clipping_norm:g})"
            if config.client_dp
            else ""
        )
        + (f", {config.fraction:g} of clients per round" if config.fraction < 1 else "")
        + (f", aggregator {config.aggregator}" if config.aggregator != "fedavg" else "")
        + (
            f", {config.attackers:g} of clients attacking ({config.attack})"
            if config.attack != "none" and config.attackers > 0
            else ""
        )
        + f"; run directory {run_dir}"
    )


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_summary(summary: RunSummary, run_dir: Path, report: Path) -> None:
    from simulations.report import (
        BASELINE_COLUMNS,
        PRIVACY_COLUMNS,
        baseline_rows,
        baseline_verdict,
        privacy_rows,
    )

    final = summary.final_metrics
    console.print(
        f"\n[bold]Final test AUROC {_number(final['auroc'])}[/bold]  "
        f"AUPRC {_number(final.get('auprc'))}  "
        f"recall at 1% FPR {_number(final.get('recall_at_1pct_fpr'))}  "
        f"accuracy {final['accuracy']:.4f}  loss {final['loss']:.4f}  "
        f"after {summary.rounds} rounds"
    )
    if len(summary.clients) <= MAX_PRINTED_CLIENTS:
        table = Table(title="Privacy spent per client", title_justify="left")
        for column in PRIVACY_COLUMNS:
            table.add_column(column, justify="left" if column == "client" else "right")
        for row in privacy_rows(summary):
            table.add_row(*row)
        console.print(table)
    if summary.baselines:
        table = Table(title="Federated model beside its baselines", title_justify="left")
        for index, column in enumerate(BASELINE_COLUMNS):
            table.add_column(column, justify="left" if index == 0 else "right")
        for row in baseline_rows(summary):
            table.add_row(*row)
        console.print(table)
        console.print(baseline_verdict(summary))
    if summary.dp and summary.clients:
        worst = max(client["epsilon"] for client in summary.clients)
        console.print(
            f"Max epsilon over clients: {worst:.3f} at delta {summary.delta:g} "
            f"(target {summary.target_epsilon}, {str(summary.accountant).upper()} accountant)"
        )
    if summary.client_level_dp:
        central = summary.client_level_dp
        console.print(
            f"Client-level epsilon (whole clients, server-side DP): {central['epsilon']:.3f} at "
            f"delta {central['delta']:g} ({central['accountant'].upper()} accountant, "
            f"{len(central['releases'])} releases)"
        )
    console.print(f"Report: {report}  Summary: {run_dir / SUMMARY_FILE}")
