"""`fedmodel sweep SCENARIO ...`: tune a scenario on a grid of simulate's options, per epsilon."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import click
import typer
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError, FedModelError
from fedmodel.run_directory import Scoring

console = Console(highlight=False, emoji=False)

SWEPT = ("epsilon", "seed", "output", "resume", "validation_fraction", "no_baselines", "engine")
"""simulate's options the sweep sets itself: neither a grid key nor passed through."""


def sweep_command(
    context: typer.Context,
    scenario: Annotated[
        str,
        typer.Argument(help="simulate's scenario: medical, financial, digits, csv or task."),
    ],
    epsilon: Annotated[
        str, typer.Option(help="The epsilons to compare, comma-separated (per client).")
    ] = "0.5,1,2",
    seeds: Annotated[
        int, typer.Option(help="Seeds of each chosen configuration (stage 2), from --seed.")
    ] = 3,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=V1,V2: one of simulate's options (lr, local-epochs, aggregator, ...) and "
            "the values to try; repeat for more keys. Every combination is one configuration.",
        ),
    ] = None,
    max_configs: Annotated[
        int, typer.Option(help="Refuse a grid of more configurations than this.")
    ] = 12,
    jobs: Annotated[
        int | None, typer.Option(help="Runs at a time (default: this machine's cores).")
    ] = None,
    validation_fraction: Annotated[
        float,
        typer.Option(help="Share of each client's training rows stage 1 holds out to score on."),
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="The first seed of each stage.")] = 0,
    validation_seeds: Annotated[
        int,
        typer.Option(
            help="Seeds of every configuration in stage 1, from --seed: the choice reads "
            "their mean, steadier where seeds differ more than configurations."
        ),
    ] = 1,
    metric: Annotated[
        str,
        typer.Option(
            help="The metric that chooses and is reported, e.g. loss to choose calibrated "
            "probabilities (default: the scenario's own, AUROC for binary tables).",
            show_default=False,
        ),
    ] = "",
    output: Annotated[
        Path | None,
        typer.Option(help="Sweep directory (default sweeps/SCENARIO); rerun to resume."),
    ] = None,
) -> None:
    """Tune simulate's options per epsilon on validation rows, then rerun the best with
    several seeds: federated, central DP and site alone, each tuned on the same grid.

    Any other simulate option (--rounds, --dataset, --clients...) goes to every run.
    Writes sweep.csv, best.csv, privacy_utility.png and sweep.md; resumable.
    """
    from simulations.sweep import run_sweep
    from simulations.sweep_plan import PlannedRun, Row, SweepDefinition
    from simulations.sweep_results import ARM_LABELS
    from simulations.sweep_runs import SweepDirectory

    epsilons = _numbers("--epsilon", epsilon)
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {seeds})")
    if validation_seeds < 1:
        raise ConfigError(f"--validation-seeds must be at least 1 (got {validation_seeds})")
    if not 0 < validation_fraction < 1:
        raise ConfigError(f"--validation-fraction must be in (0, 1) (got {validation_fraction})")
    passthrough = tuple(context.args)
    parsed_grid = _checked_grid(scenario, grid or [], passthrough)
    definition = SweepDefinition(
        scenario,
        epsilons,
        tuple(range(seed, seed + seeds)),
        parsed_grid,
        passthrough,
        validation_fraction,
        metric,
        validation_seeds,
    )
    configs = len(definition.configs())
    if configs > max_configs:
        raise ConfigError(
            f"--grid makes {configs} configurations, more than --max-configs {max_configs}; "
            "drop some values or raise --max-configs"
        )
    jobs = jobs or len(os.sched_getaffinity(0))
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {jobs})")
    directory = SweepDirectory(output or Path("sweeps") / scenario, definition)
    command = shlex.join(["fedmodel", *sys.argv[1:]])
    started = time.monotonic()
    console.print(
        f"Sweeping {scenario}: {configs} configuration(s) x {len(epsilons)} epsilon(s) at "
        f"{_seeds_from(seed, validation_seeds)} (validation rows), then each epsilon's chosen "
        f"configurations x {seeds} seeds (test set); {jobs} at a time; directory {directory.path}"
    )
    finished_here: list[float] = []

    def show_progress(run: PlannedRun, row: Row, done: int, total: int) -> None:
        finished_here.append(time.monotonic())
        elapsed = finished_here[-1] - started
        remaining = elapsed / len(finished_here) * (total - done)
        scored_on = "validation" if run.stage == 1 else "test"
        scores = "  ".join(
            f"{ARM_LABELS[arm]} {row[f'{scored_on}_{arm}'] or '-'}"
            for arm in ("federated", "central_dp", "site_alone")
        )
        console.print(
            f"stage {run.stage} run {done}/{total}  epsilon {run.epsilon:g}  seed {run.seed}  "
            f"{run.described()}  {scored_on} {Scoring.label(row['metric'])}: {scores}  "
            f"{elapsed:.0f} s elapsed, ETA {remaining:.0f} s",
            soft_wrap=True,
        )

    outcome = run_sweep(
        directory, jobs, [sys.executable, "-m", "fedmodel.cli"], command, show_progress
    )
    label = Scoring.label(outcome.metric)
    table = Table(title=f"Test {label}, mean over {seeds} seeds (± half the 95% t-interval)")
    columns = ("epsilon", "arm", "configuration", f"validation {label}", f"test {label}")
    for column in (*columns, "test log-loss"):
        table.add_column(column, overflow="fold")  # a narrow terminal folds, never cuts
    for result in outcome.results:
        interval = f" ± {result.half_width:.4f}" if result.half_width is not None else ""
        table.add_row(
            f"{result.epsilon:g}",
            ARM_LABELS[result.arm],
            "\n".join(f"{key}={value}" for key, value in result.config) or "defaults",
            "-" if result.validation is None else f"{result.validation:.4f}",
            "-" if result.mean is None else f"{result.mean:.4f}{interval}",
            "-" if result.mean_loss is None else f"{result.mean_loss:.4f}",
        )
    console.print(table)
    if outcome.constant_loss is not None:
        console.print(
            "No model (one constant for every row: for a yes/no outcome, the training rows' "
            f"base rate) scores test log-loss {outcome.constant_loss:.4f}."
        )
    console.print(
        f"Report: {directory.path / 'sweep.md'}  Plot: {directory.path / 'privacy_utility.png'}"
        f"  All runs: {directory.path / 'sweep.csv'}"
    )


def _seeds_from(first: int, count: int) -> str:
    return f"seed {first}" if count == 1 else f"seeds {first}-{first + count - 1}"


def _numbers(flag: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"{flag} takes numbers separated by commas, e.g. 0.5,1,2 (got {text!r})"
        ) from None
    if not all(value > 0 for value in values) or len(set(values)) != len(values):
        raise ConfigError(f"{flag} takes distinct positive numbers (got {text!r})")
    return values


def _checked_grid(
    scenario: str, grid: list[str], passthrough: tuple[str, ...]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Each `--grid KEY=V1,V2` as (KEY, values), every value parsed by simulate SCENARIO's
    own option and checked by RunConfig; the pass-through options parsed the same way."""
    command = _simulate_command(scenario)
    options = {
        option.lstrip("-"): param
        for param in command.params
        for option in param.opts
        if option.startswith("--")
    }
    _parse(command, scenario, list(passthrough), "")
    parsed: dict[str, tuple[str, ...]] = {}
    for item in grid:
        key, equals, values = item.partition("=")
        if not equals or not key or not values:
            raise ConfigError(f"--grid takes KEY=V1,V2 (e.g. lr=0.1,0.3), got {item!r}")
        param = options.get(key)
        if param is None or param.name in SWEPT or not isinstance(param, click.Option):
            raise ConfigError(
                f"--grid {key}: not an option the sweep can vary; use one of simulate "
                f"{scenario}'s options (see 'fedmodel simulate {scenario} --help'), other than "
                "epsilon and seed (--epsilon, --seed)"
            )
        if key in parsed:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        choices = tuple(values.split(","))
        for value in choices:
            _parse(command, scenario, [*passthrough, f"--{key}={value}"], f"--grid {key}={value}: ")
        parsed[key] = choices
    return tuple(parsed.items())


def _simulate_command(scenario: str) -> click.Command:
    from fedmodel.cli.simulate import simulate_app

    group = typer.main.get_command(simulate_app)
    assert isinstance(group, click.Group)
    found = group.get_command(click.Context(group), scenario)
    if found is None:
        choices = ", ".join(group.list_commands(click.Context(group)))
        raise ConfigError(f"unknown scenario '{scenario}'; choose one of: {choices}")
    return found


def _parse(command: click.Command, scenario: str, args: list[str], where: str) -> None:
    """Parse `args` as simulate SCENARIO would, and check the run config they make."""
    try:
        context = command.make_context(f"fedmodel simulate {scenario}", args)
    except click.ClickException as error:
        raise ConfigError(f"{where}{error.format_message()}") from None
    typed = {
        name
        for name in context.params
        if context.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }
    if swept := sorted(typed & set(SWEPT)):
        flags = ", ".join("--" + name.replace("_", "-") for name in swept)
        raise ConfigError(f"{where}the sweep sets {flags} itself; drop it")
    if context.params.get("no_dp") or context.params.get("dp") in ("off", "client"):
        raise ConfigError(
            f"{where}a sweep compares epsilons, which needs DP-SGD on the clients; "
            "drop --no-dp or --dp off/client"
        )
    fields = RunConfig.config_keys()
    values = {name: context.params[name] for name in typed if name in fields}
    try:
        RunConfig(**values)
    except FedModelError as error:
        raise ConfigError(f"{where}{error}") from None
