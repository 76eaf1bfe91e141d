"""`fedmodel run`: train on a federation's enrolled nodes (the operator's run)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedmodel.cli.options import (
    DISTRIBUTED_DP_KEYS,
    NO_DP,
    RESUME,
    SHARED_KEYS,
    command,
    config_options,
    dp_mode,
    parameter,
)
from fedmodel.config import TABULAR_TASK, RunConfig, Section
from fedmodel.errors import ConfigError

console = Console(highlight=False, emoji=False, soft_wrap=True)  # paths stay greppable

OUTPUT = Section.OUTPUT.value
Output = Annotated[
    Path | None,
    typer.Option(help="Run directory (default DIR/runs/<timestamp>).", rich_help_panel=OUTPUT),
]
Verbose = Annotated[
    bool, typer.Option(help="Show every ServerApp log line.", rich_help_panel=OUTPUT)
]
RecordMessages = Annotated[  # a debug aid: what the coordinator saw, kept in the run directory
    bool,
    typer.Option(
        help="Keep every reply the ServerApp receives in RUN/received/.",
        hidden=True,
        rich_help_panel=OUTPUT,
    ),
]
FederationDir = Annotated[
    Path,
    typer.Option("--dir", help="Federation directory.", rich_help_panel=Section.FEDERATION.value),
]
TaskName = Annotated[
    str,
    typer.Option(
        "--installed-task",
        help="Installed task the nodes train: its name, at the version installed here (each "
        "node must have it installed and approved).",
        rich_help_panel=Section.RUN.value,
    ),
]


def _run(options: dict[str, Any]) -> None:
    """Build the RunConfig from the options (named like its fields) and launch the run."""
    from client.tasks import installed_task
    from fedmodel.protocol import REFUSAL_MARKER
    from fedmodel.run_directory import SUMMARY_FILE, Scoring, describe_client_level_dp
    from fedmodel.runtime.flwr_run import progress_line
    from server.aggregators import check_aggregator
    from server.enrollment import load_registry
    from server.launch import launch_run
    from server.resume import resume_config
    from server.superlink import Federation

    options = dict(options)
    # named, never shipped: the nodes run their own installed copy
    task = installed_task(options.pop("installed_task"))
    directory, resume = options.pop("directory"), options.pop("resume")
    output, verbose = options.pop("output"), options.pop("verbose")
    options["dp"] = dp_mode(options["dp"], options.pop("no_dp"))
    config = RunConfig(  # checked before the federation is loaded
        scenario="deployment",
        dataset="local",
        clients=options["min_clients"],
        run_uid=uuid.uuid4().hex,
        app_task=task.name,
        app_task_version=task.version,
        **options,
    )
    federation = Federation.load(directory)
    config = config.replace(federation_dir=str(federation.directory))
    if resume is not None:
        config = resume_config(resume, "deployment").replace(
            federation_dir=str(federation.directory)
        )
        output = resume
    check_aggregator(config.aggregator, config.clients, config.byzantine)  # as simulate does
    run_dir = (output or federation.path("runs") / time.strftime("%Y%m%d-%H%M%S")).absolute()
    if not config.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} already exists and is not empty")
    console.print(
        ("Resuming" if config.resume else "Training")
        + f" on at least {config.min_clients} enrolled nodes for {config.rounds} rounds "
        + (
            f"under DP-SGD (epsilon {config.epsilon} per node)"
            if config.sample_dp
            else "without DP-SGD"
        )
        + (f", client-level DP (noise {config.central_noise:g})" if config.client_dp else "")
        + (
            f", distributed DP (each node clips to {config.distributed_clip:g} and adds its "
            f"share of noise {config.distributed_noise:g}, {config.distributed_bits} bits)"
            if config.distributed_dp
            else ""
        )
        + (", secure aggregation (SecAgg+)" if config.secagg else "")
        + f"; run directory {run_dir}"
    )
    started = time.monotonic()

    def show_progress(row: dict[str, Any]) -> None:
        scores = Scoring.from_json(row["scoring"]).described(row, skip_missing=True)
        measures = f"nodes {row['clients']}  " + "  ".join(scores) + " (nodes' hold-outs)"
        console.print(progress_line(row, measures, time.monotonic() - started))

    names = {str(entry["node_id"]): name for name, entry in load_registry(federation).items()}

    def show_log_line(line: str) -> None:
        """Every line with --verbose; otherwise the nodes' refusals, by node name."""
        if verbose:
            console.out(line)
        elif REFUSAL_MARKER in line:
            node, _, reason = line.split(REFUSAL_MARKER, 1)[1].strip().partition(":")
            console.print(f"{REFUSAL_MARKER} {names.get(node, node)}:{reason}", markup=False)

    summary = launch_run(federation, config, run_dir, show_progress, show_log_line)
    table = Table(title="Privacy spent per node", title_justify="left")
    for column in ("node", "rows", "epsilon", "delta"):
        table.add_column(column)
    for client in summary.clients:
        eps = client.get("epsilon")
        table.add_row(
            str(client.get("node", client["client"])),
            "-" if client.get("num_examples") is None else str(client["num_examples"]),
            "-" if eps is None else f"{eps:.3f}",
            "-" if client.get("delta") is None else f"{client['delta']:g}",
        )
    console.print(table)
    if summary.client_level_dp:  # --dp client or distributed: whole nodes, this run
        console.print(describe_client_level_dp(summary.client_level_dp))
    if summary.stopped_early:
        console.print(f"Stopped early: {summary.stopped_early}")
    console.print(f"Summary: {run_dir / SUMMARY_FILE}")


run_command = command(
    "run",
    "Train on the federation's enrolled nodes (the SuperLink must be running).",
    [
        parameter("directory", FederationDir, ...),
        *config_options(
            (
                *SHARED_KEYS,
                "evaluation",
                "secagg",
                "secagg_shares",
                "secagg_threshold",
                *DISTRIBUTED_DP_KEYS,
            )
        ),
        NO_DP,
        RESUME,
        parameter("installed_task", TaskName, TABULAR_TASK),
        parameter("output", Output, None),
        parameter("verbose", Verbose, False),
        parameter("record_messages", RecordMessages, False),
    ],
    _run,
)
