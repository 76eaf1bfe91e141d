"""`fedmodel simulate ...`: run a simulated federation and print its privacy report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError

DEFAULTS = RunConfig()
console = Console(highlight=False)

simulate_app = typer.Typer(
    help="Simulate a federation on this machine (Flower Simulation Engine).",
    no_args_is_help=True,
)


@simulate_app.command("medical")
def simulate_medical(
    clients: Annotated[int, typer.Option(help="Number of hospitals.")] = DEFAULTS.clients,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = DEFAULTS.rounds,
    epsilon: Annotated[
        float, typer.Option(help="Privacy budget per hospital for the whole run.")
    ] = DEFAULTS.epsilon,
    delta: Annotated[float, typer.Option(help="DP delta per hospital.")] = DEFAULTS.delta,
    local_epochs: Annotated[
        int, typer.Option(help="Local epochs per round.")
    ] = DEFAULTS.local_epochs,
    batch_size: Annotated[
        int, typer.Option(help="Expected batch size (Poisson sampling).")
    ] = DEFAULTS.batch_size,
    lr: Annotated[float, typer.Option(help="Local SGD learning rate.")] = DEFAULTS.lr,
    max_grad_norm: Annotated[
        float, typer.Option(help="Per-sample gradient clipping norm.")
    ] = DEFAULTS.max_grad_norm,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Train without DP (baseline).")] = False,
    partition: Annotated[
        str, typer.Option(help="How rows are split: iid or dirichlet.")
    ] = DEFAULTS.partition,
    alpha: Annotated[
        float, typer.Option(help="Dirichlet concentration (smaller = more skewed).")
    ] = DEFAULTS.alpha,
    model: Annotated[str, typer.Option(help="Model: mlp or logreg.")] = DEFAULTS.model,
    seed: Annotated[int, typer.Option(help="Seed for partitioning and training.")] = DEFAULTS.seed,
    output: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/<timestamp>-medical).")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show every Flower and Ray log line.")] = False,
) -> None:
    """Hospitals train a mortality model on the flchain cohort under DP-SGD."""
    config = RunConfig(
        scenario="medical",
        dataset="flchain",
        clients=clients,
        rounds=rounds,
        local_epochs=local_epochs,
        batch_size=batch_size,
        lr=lr,
        dp=not no_dp,
        epsilon=epsilon,
        delta=delta,
        max_grad_norm=max_grad_norm,
        partition=partition,
        alpha=alpha,
        seed=seed,
        model=model,
    )
    _simulate(config, output, verbose)


def _simulate(config: RunConfig, output: Path | None, verbose: bool) -> None:
    from fedmodel.models import build_model
    from server.run_record import write_json_atomic
    from simulations.report import write_report
    from simulations.runner import run_federation
    from simulations.scenarios import client_partitions

    run_dir = output or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.scenario}"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run directory {run_dir} already exists and is not empty; pass another --output"
        )
    with console.status("Loading data and partitioning it across clients..."):
        partitions = client_partitions(config)  # fails fast, before any engine starts
        build_model(config.model, partitions[0].num_features)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = config.replace(output_dir=str(run_dir.absolute()))
    write_json_atomic(run_dir / "config.json", {**config.to_run_config()})
    console.print(
        f"Simulating {config.clients} {config.scenario} clients for {config.rounds} rounds "
        + (
            f"under DP-SGD (epsilon {config.epsilon}, delta {config.delta:g})"
            if config.dp
            else "without DP"
        )
        + f"; run directory {run_dir}"
    )
    started = time.monotonic()
    status = console.status("Starting Flower's simulation engine (takes ~20 s)...")
    status.start()

    def show_progress(row: dict[str, Any]) -> None:
        status.update(f"Training round {row['round'] + 1}/{row['rounds']}...")
        epsilon = "" if row["max_epsilon"] is None else f"  max epsilon {row['max_epsilon']:.3f}"
        console.print(
            f"round {row['round']}/{row['rounds']}  AUROC {row['auroc']:.4f}  "
            f"accuracy {row['accuracy']:.4f}{epsilon}  ({time.monotonic() - started:.0f} s)"
        )

    try:
        summary = run_federation(
            config, run_dir, show_progress, (lambda line: console.out(line)) if verbose else None
        )
    finally:
        status.stop()
    report = write_report(run_dir, summary)
    _print_summary(summary, run_dir, report)


def _print_summary(summary: dict[str, Any], run_dir: Path, report: Path) -> None:
    from simulations.report import PRIVACY_COLUMNS, privacy_rows

    final = summary["final"]
    console.print(
        f"\n[bold]Final test AUROC {final['auroc']:.4f}[/bold]  accuracy {final['accuracy']:.4f}  "
        f"loss {final['loss']:.4f}  after {summary['rounds']} rounds"
    )
    table = Table(title="Privacy spent per hospital", title_justify="left")
    for column in PRIVACY_COLUMNS:
        table.add_column(column, justify="left" if column == "client" else "right")
    for row in privacy_rows(summary):
        table.add_row(*row)
    console.print(table)
    if summary["dp"]:
        worst = max(client["epsilon"] for client in summary["clients"])
        console.print(
            f"Max epsilon over hospitals: {worst:.3f} at delta {summary['delta']:g} "
            f"(target {summary['target_epsilon']}, {summary['accountant'].upper()} accountant)"
        )
    console.print(f"Report: {report}  Summary: {run_dir / 'summary.json'}")
