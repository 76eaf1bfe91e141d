"""`fedmodel simulate ...`: run a simulated federation and print its privacy report."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedmodel.cli.options import (
    DISTRIBUTED_DP_KEYS,
    NO_DP,
    RESUME,
    SHARED_KEYS,
    command,
    config_option,
    config_options,
    dp_mode,
    parameter,
)
from fedmodel.config import TASK_SCENARIO, RunConfig, Section
from fedmodel.errors import ConfigError
from fedmodel.run_directory import (
    CONFIG_FILE,
    REPORT_HTML_FILE,
    SUMMARY_FILE,
    RunSummary,
    Scoring,
    describe_client_level_dp,
    write_json_atomic,
)

if TYPE_CHECKING:  # importing tasks loads torch: the CLI imports them when it runs
    import inspect

    from fedmodel.task import Task

DEFAULTS = RunConfig()
console = Console(highlight=False, emoji=False)

simulate_app = typer.Typer(
    help="Simulate a federation on this machine: a local worker pool by default, "
    "Flower's Simulation Engine (Ray) with --engine ray.",
    no_args_is_help=True,
)

# Keys only a simulation has: sampling, data skew, attacks, SecAgg+ (and distributed DP
# under it), budgets, hardware.
SIMULATION_KEYS = (
    "fraction",
    "partition",
    "alpha",
    "validation_fraction",
    "budget_epsilon",
    "ledger_dir",
    "central_adaptive",
    "central_target_quantile",
    "central_clip_lr",
    "central_count_stddev",
    "proximal_mu",
    "attack",
    "attackers",
    "secagg",
    "secagg_shares",
    "secagg_threshold",
    "secagg_dropouts",
    *DISTRIBUTED_DP_KEYS,
    "device",
    "gpus_per_client",
)
OUTPUT, ENGINE = Section.OUTPUT.value, Section.ENGINE.value
Output = Annotated[
    Path | None,
    typer.Option(
        help="Run directory (default runs/<timestamp>-<scenario>).", rich_help_panel=OUTPUT
    ),
]
Verbose = Annotated[
    bool, typer.Option(help="Show every Flower and Ray log line.", rich_help_panel=OUTPUT)
]
Engine = Annotated[
    str,
    typer.Option(
        help="local: a warm worker pool on this machine (fast); "
        "ray: Flower's Simulation Engine (for Ray clusters).",
        metavar="[local|ray]",
        rich_help_panel=ENGINE,
    ),
]
BaselineSites = Annotated[
    int,
    typer.Option(
        help="Sites trained alone for the local-only baseline (a fixed sample).",
        rich_help_panel=OUTPUT,
    ),
]
NoBaselines = Annotated[
    bool,
    typer.Option(
        "--no-baselines", help="Skip the central and local-only baselines.", rich_help_panel=OUTPUT
    ),
]

# Every scenario command takes these, in this order; a scenario may override a default.
COMMON_OPTIONS: tuple[inspect.Parameter, ...] = (
    config_option("clients", None),
    *config_options(SHARED_KEYS),
    *config_options(SIMULATION_KEYS),
    NO_DP,
    RESUME,
    parameter("output", Output, None),
    parameter("verbose", Verbose, False),
    parameter("engine", Engine, "local"),
    parameter("baseline_sites", BaselineSites, 10),
    parameter("no_baselines", NoBaselines, False),
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
    own = {option.name for option in own_options}
    parameters = [*own_options, *(p for p in COMMON_OPTIONS if p.name not in own)]

    def body(options: dict[str, Any]) -> None:
        _run(scenario, prepare(options))

    simulate_app.command(scenario)(command(f"simulate_{scenario}", summary, parameters, body))


# Issue 20's sweeps (docs/simulation.md): each dataset's defaults are the settings that
# `fedmodel sweep` chose for its federation on validation rows, where they won by more
# than 0.001 AUROC (lending-club's and covid-clinics' by the mean of three validation
# seeds); an option given on the command line wins. The scenario's options for
# these keys default to None so that a given value can be told from a default.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "flchain": {"model": "logreg"},
    "covid-clinics": {"model": "mlp", "max_grad_norm": 0.5},
    "breast-cancer": {"model": "logreg", "lr": 0.25, "local_epochs": 2, "max_grad_norm": 0.5},
    "synthetic-ehr": {"model": "logreg", "lr": 2.0, "clients": 25},
    "lending-club": {"model": "logreg"},
    "credit-default": {"model": "logreg"},
    "synthetic-fraud": {"model": "logreg", "lr": 1.0, "clients": 100},
}
DATASET_DEFAULT_KEYS = ("model", "lr", "local_epochs", "max_grad_norm", "clients")


def _flags(settings: Mapping[str, Any]) -> str:
    keys = RunConfig.config_keys()
    return " ".join(
        f"{keys[key].flag} {f'{value:g}' if isinstance(value, float) else value}"
        for key, value in settings.items()
    )


def _dataset(default: str, datasets: Sequence[str]) -> list[inspect.Parameter]:
    """--dataset (each scenario has its own), which names each dataset's tuned settings,
    and the options they tune, whose help points there."""
    by_settings: dict[str, list[str]] = {}
    for name in datasets:
        by_settings.setdefault(_flags(DATASET_DEFAULTS[name]), []).append(name)
    tuned = "; ".join(f"{', '.join(names)}: {flags}" for flags, names in by_settings.items())
    text = f"{', '.join(datasets[:-1])} or {datasets[-1]}. Each dataset's defaults: {tuned}."
    option = typer.Option(help=text, rich_help_panel=Section.DATA.value)
    own = [
        config_option(key, None, shown_default=_shown_default(key, datasets))
        for key in DATASET_DEFAULT_KEYS
    ]
    return [parameter("dataset", Annotated[str, option], default), *own]


def _shown_default(key: str, datasets: Sequence[str]) -> Any:
    """What --KEY's help names as its default: one value where the datasets agree."""
    own = [DATASET_DEFAULTS[name].get(key) for name in datasets]
    values = {getattr(DEFAULTS, key) if value is None else value for value in own}
    if len(values) == 1:
        return next(iter(values))
    if None not in own:
        return "set by --dataset"
    return f"{getattr(DEFAULTS, key)}, or set by --dataset"


def with_dataset_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """Options left out take the dataset's tuned default, else the shared one."""
    tuned = DATASET_DEFAULTS.get(options.get("dataset", ""), {})
    return options | {
        key: tuned.get(key, getattr(DEFAULTS, key))
        for key in DATASET_DEFAULT_KEYS
        if key in options and options[key] is None
    }


def _prepare_csv(options: dict[str, Any]) -> dict[str, Any]:
    data = Path(options["data"])
    return options | {
        "data": str(data.absolute()),
        "dataset": data.name,
        "partition_by": options["partition_by"] or "",
    }


_scenario_command(
    "medical",
    "Hospitals train a risk model under DP-SGD (default: flchain mortality).",
    _dataset("flchain", ("flchain", "covid-clinics", "breast-cancer", "synthetic-ehr")),
)
_scenario_command(
    "financial",
    "Banks train a credit-risk or fraud model under DP-SGD (default: lending-club).",
    _dataset("lending-club", ("lending-club", "credit-default", "synthetic-fraud")),
)
_scenario_command(
    "digits",
    "Devices train a digit classifier on 5,000 real MNIST digits (10 classes) under "
    "DP-SGD: logistic regression by default (--model cnn for the small CNN).",
    # Issue 20's measurements (docs/simulation.md): under DP-SGD the linear model at lr 2
    # beats the CNN, federated and central alike.
    config_options(("partition", "model", "lr"), partition="dirichlet", model="logreg", lr=2.0),
    lambda options: options | {"dataset": "mnist-5k"},
)
_scenario_command(
    "csv",
    "Simulate a federation on your own table (one client per --partition-by value): "
    "a linear model by default (--model mlp for the 32-16 MLP).",
    # Issue 20's measurements (docs/sweep.md): on seven tables the linear model at lr 0.5
    # matched or beat the MLP federated, and on sites of a few dozen rows by far.
    config_options(
        ("data", "label", "task", "partition_by", "model"),
        data=...,
        label=...,
        partition_by=None,
        model="logreg",
    ),
    _prepare_csv,
)
TASK_REFERENCE = parameter(
    "task_ref",
    Annotated[
        str,
        typer.Argument(
            metavar="MODULE:ATTR",
            help="Your fedmodel.Task (or a function of the RunConfig returning one), as "
            "module:attribute importable here (e.g. from a directory on PYTHONPATH), or the "
            "name of an installed task (a 'fedmodel.tasks' entry point).",
            show_default=False,
        ),
    ],
    ...,
)
_scenario_command(
    TASK_SCENARIO,
    "Simulate a federation on your own Task: your PyTorch model, data and per-sample loss.",
    [TASK_REFERENCE, config_option("fix_model")],
    lambda options: options | {"dataset": options["task_ref"]},
)


def _run(scenario: str, options: dict[str, Any]) -> None:
    """Build the RunConfig from a command's options (named like its fields) and simulate."""
    options = dict(options)
    output, verbose = options.pop("output"), options.pop("verbose")
    engine = options.pop("engine")
    baseline_sites, no_baselines = options.pop("baseline_sites"), options.pop("no_baselines")
    clients_given = options["clients"] is not None
    options = with_dataset_defaults(options)
    options["dp"] = dp_mode(options["dp"], options.pop("no_dp"))
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
    from fedmodel.runtime.flwr_run import progress_line
    from simulations.runner import ENGINES, started_engine

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
        from fedmodel.task import client_datasets
        from fedmodel.task_checks import check_task
        from fedmodel.task_loading import load_task, resolve_clients
        from server.aggregators import check_aggregator
        from simulations.heterogeneity import heterogeneity
        from simulations.runner import check_device

        check_device(config)  # a GPU that is not there: say so before loading any data
        with console.status("Loading the task's data and checking it..."):
            task = load_task(config)
            config = resolve_clients(config, task, clients_given)
            notes = check_task(task, config)
            check_aggregator(config.aggregator, config.clients_per_round, config.byzantine)
            clients = client_datasets(task, config.clients, config.seed)
            test_set = task.test_data(config.seed)
            non_iid = heterogeneity(
                clients, task.metrics if isinstance(task.metrics, str) else None
            )
        for note in [*notes, *_small_client_batches(config, clients, task.site_names)]:
            console.print(note, soft_wrap=True)
        config = config.replace(  # the engine runs elsewhere: paths must be absolute
            output_dir=str(run_dir.absolute()),
            ledger_dir=str(Path(config.ledger_dir).absolute()) if config.ledger_dir else "",
        )
        if not config.resume:  # a resumed run keeps the config.json it started with
            write_json_atomic(run_dir / CONFIG_FILE, config.relative_to(run_dir).to_run_config())
        _announce(config, task, run_dir)
        started = time.monotonic()
        status = console.status(
            "Starting Flower's simulation engine (takes ~20 s)..."
            if engine == "ray"
            else "Starting the simulation workers (takes a few seconds)..."
        )
        status.start()

        def show_progress(row: dict[str, Any]) -> None:
            status.update(f"Training round {row['round'] + 1}/{row['rounds']}...")
            measures = "  ".join(Scoring.from_json(row["scoring"]).described(row))
            # one line per round, however many metrics the task scores
            console.print(progress_line(row, measures, time.monotonic() - started), soft_wrap=True)

        try:
            summary = run_on_engine(
                config, show_progress, (lambda line: console.out(line)) if verbose else None
            )
        finally:
            status.stop()
    from simulations.baselines import run_baselines
    from simulations.report import write_report
    from simulations.report_html import write_html_report

    summary = replace(
        summary,
        seconds=round(time.monotonic() - started, 1),
        federation={
            **task.notes,
            "task": task.name,
            "site_names": list(task.site_names),
            "fraction": config.fraction,
        },
        heterogeneity=non_iid,
    )
    if baseline_sites is not None:

        def show_baseline(number: int, total: int, name: str, scores: Mapping[str, Any]) -> None:
            measures = "  ".join(summary.scoring.described(scores, skip_missing=True))
            spent = f"  epsilon {scores['epsilon']:.3f}" if "epsilon" in scores else ""
            elapsed = time.monotonic() - started
            line = f"baseline {number}/{total}  {name}  {measures}{spent}  {elapsed:.0f} s elapsed"
            console.print(line, soft_wrap=True)

        with console.status("Training baselines (central, central DP, each site alone)..."):
            baselines = run_baselines(
                config,
                task,
                clients,
                test_set,
                summary.final_metrics,
                baseline_sites,
                show_baseline,
            )
        summary = replace(summary, baselines=baselines)
    summary.save(run_dir)
    report = write_report(run_dir, summary)
    write_html_report(run_dir, summary)
    _print_summary(summary, run_dir, report)
    if summary.stopped_early:
        console.print(f"Stopped early: {summary.stopped_early}")


def _small_client_batches(
    config: RunConfig, clients: Sequence[Any], site_names: Sequence[str]
) -> list[str]:
    """The line naming the clients that train with a smaller batch than --batch-size, and
    why (fedmodel.sampling.client_batch_size); none when every client keeps it."""
    from fedmodel.data import row_count
    from fedmodel.sampling import MIN_STEPS_PER_EPOCH, client_batch_size

    smaller = []
    for index, data in enumerate(clients):
        rows = row_count(data)
        if (batch := client_batch_size(rows, config.batch_size)) < config.batch_size:
            name = site_names[index] if index < len(site_names) else str(index)
            smaller.append(f"{name} ({rows} rows) {batch}")
    if not smaller:
        return []
    shown = ", ".join(smaller[:10]) + (
        f" and {len(smaller) - 10} more" if len(smaller) > 10 else ""
    )
    return [
        f"{_count(len(smaller), 'client')} hold fewer than {MIN_STEPS_PER_EPOCH} batches of "
        f"--batch-size {config.batch_size} and train with an expected batch of at most a "
        f"quarter of their rows (at least {MIN_STEPS_PER_EPOCH} DP-SGD steps per epoch): "
        f"client (rows) batch: {shown}"
    ]


def _announce(config: RunConfig, task: Task, run_dir: Path) -> None:
    """What is about to run: the federation, the privacy settings, where results go."""
    natural, too_small = task.notes.get("natural_sites"), task.notes.get("too_small_to_train")
    if natural is not None and isinstance(too_small, list):
        rows = f"{task.notes['min_dp_rows']} training rows"
        console.print(
            f"{config.dataset}: {_count(natural, 'natural site')}; "
            + (
                f"{len(too_small)} of them have fewer than {rows}, too few for DP-SGD, and sit "
                f"out; {config.clients} train"
                if too_small
                else f"each has at least {rows} and trains"
            )
        )
    what = config.task_ref if config.scenario == TASK_SCENARIO else config.dataset
    console.print(
        f"Simulating {config.clients} {config.scenario} clients ({what}) for "
        f"{_count(config.rounds, 'round')} "
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
        + (
            f", client-level DP added by the clients under SecAgg+ (noise "
            f"{config.distributed_noise:g}, clip {config.distributed_clip:g}, "
            f"{config.distributed_bits} bits)"
            if config.distributed_dp
            else ""
        )
        + (f", {config.fraction:g} of clients per round" if config.fraction < 1 else "")
        + (f", aggregator {config.aggregator}" if config.aggregator != "fedavg" else "")
        + (
            f", {config.attackers:g} of clients attacking ({config.attack})"
            if config.attack != "none" and config.attackers > 0
            else ""
        )
        + (
            f", scored on a validation split ({config.validation_fraction:g} of each client's "
            "training rows, held out), not the test set"
            if config.validation_fraction > 0
            else ""
        )
        + f"; run directory {run_dir}"
    )


def _print_summary(summary: RunSummary, run_dir: Path, report: Path) -> None:
    from simulations.report import (
        PRIVACY_COLUMNS,
        baseline_columns,
        baseline_rows,
        baseline_verdict,
        privacy_rows,
    )

    headline, *others = summary.scoring.described(summary.final_metrics)
    console.print(
        f"\n[bold]Final {summary.scored_on} {headline}[/bold]  {'  '.join(others)}  "
        f"after {_count(summary.rounds, 'round')}",
        soft_wrap=True,
    )
    rows = privacy_rows(summary)
    if rows:
        listed = "" if len(rows) == len(summary.clients) else (
            f" ({len(rows)} of {len(summary.clients)} that bound the spread; all in clients.csv)"
        )  # fmt: skip
        table = Table(title="Privacy spent per client" + listed, title_justify="left")
        for column in PRIVACY_COLUMNS:
            table.add_column(column, justify="left" if column == "client" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if summary.baselines:
        table = Table(title="Federated model beside its baselines", title_justify="left")
        for index, column in enumerate(baseline_columns(summary.scoring)):
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
        console.print(describe_client_level_dp(summary.client_level_dp))
    console.print(
        f"Report: {report} (one page: {run_dir / REPORT_HTML_FILE})  "
        f"Summary: {run_dir / SUMMARY_FILE}"
    )


def _count(number: object, noun: str) -> str:
    """ "1 round", "3 rounds": never "1 rounds"."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
