"""`fedmodel audit PATH` (verify ledgers) and `fedmodel audit empirical` (canary audit)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from fedmodel.errors import ExitCode

console = Console(highlight=False, emoji=False)
progress = Console(stderr=True, highlight=False, emoji=False)  # keeps --json's stdout clean
PROGRESS_LINES = 20  # about this many progress lines at most, however many ledgers

VERIFY_COMMAND = "ledgers"


class _PathOrSubcommand(TyperGroup):
    """`fedmodel audit PATH` means `fedmodel audit ledgers PATH`; subcommands still work."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [VERIFY_COMMAND, *args]
        return super().parse_args(ctx, args)


audit_app = typer.Typer(
    cls=_PathOrSubcommand,
    help="Verify privacy ledgers or run an empirical canary audit.\n\n"
    "fedmodel audit PATH [--json] [--delta D] [--plots DIR] [--public-key node.pub] is "
    "short for 'fedmodel audit ledgers PATH ...': 'fedmodel audit ledgers --help' "
    "explains each option. It only reads PATH; plots are written only where --plots says.",
    no_args_is_help=True,
)


@audit_app.command(VERIFY_COMMAND)
def audit_ledgers(
    path: Annotated[
        Path, typer.Argument(help="A run directory, a directory of ledgers or one ledger file.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    delta: Annotated[
        float | None,
        typer.Option(
            help="Also report epsilon at this delta. Spent, remaining and the budget check "
            "stay at the delta each owner's budget was set at."
        ),
    ] = None,
    plots: Annotated[
        Path | None,
        typer.Option(help="Write one PNG of epsilon per round per owner here (default: none)."),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(help="The node's node.pub: every entry must carry its valid signature."),
    ] = None,
) -> None:
    """Verify hash chains, recompute every epsilon afresh (Opacus RDP, dp-accounting PLD).

    Nothing is read from the accounting cache the training path uses. Exits with code 1
    when any check fails.
    """
    from fedmodel.errors import ConfigError
    from fedmodel.privacy.audit import LedgerAudit, audit

    if delta is not None and not 0 < delta < 1:
        raise ConfigError(f"--delta must be between 0 and 1 (got {delta})")
    started = time.monotonic()

    def show_progress(number: int, total: int, ledger: LedgerAudit) -> None:
        if number == total or number % max(1, total // PROGRESS_LINES) == 0:
            verdict = "verified" if ledger.ok else "FAILED"
            elapsed = time.monotonic() - started
            line = f"ledger {number}/{total}  {Path(ledger.path).name}  {verdict}"
            progress.print(f"{line}  {elapsed:.0f} s elapsed", soft_wrap=True)

    # an audit writes nothing into PATH
    report = audit(path, delta, plots, public_key, show_progress)
    if as_json:
        console.out(json.dumps(report.to_json(), indent=2, allow_nan=False))
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(code=ExitCode.FAILED)


def _print_report(report: Any) -> None:
    owners = [owner for ledger in report.ledgers for owner in ledger.owners]
    table = Table(title=f"Privacy ledgers in {report.target}", title_justify="left")
    columns = ("owner", "budget", "spent (RDP)", "PLD", "remaining", "delta", "rounds", "runs")
    for column in columns:
        table.add_column(column, justify="left" if column == "owner" else "right")
    for owner in owners:
        budget = "-" if owner.budget_epsilon is None else f"{owner.budget_epsilon:g}"
        remaining = "-" if owner.remaining is None else f"{owner.remaining:.4f}"
        rounds = str(owner.rounds) + (
            f" ({owner.uncommitted} uncommitted)" if owner.uncommitted else ""
        )
        table.add_row(
            owner.owner,
            budget,
            f"{owner.spent_epsilon:.4f}",
            _number(owner.pld_epsilon),
            remaining,
            f"{owner.delta:g}",
            rounds,
            str(owner.runs),
        )
    if owners:  # a --dp distributed run without DP-SGD has no owner ledgers
        console.print(table)
    at_delta = [owner for owner in owners if owner.at_delta is not None]
    if at_delta:
        console.print(
            f"The same spending at delta {at_delta[0].at_delta:g} (budgets stay checked at "
            "each owner's delta above):"
        )
        extra = Table()
        for column in ("owner", "RDP", "PLD"):
            extra.add_column(column, justify="left" if column == "owner" else "right")
        for owner in at_delta:
            extra.add_row(
                owner.owner, f"{owner.epsilon_at_delta:.4f}", _number(owner.pld_epsilon_at_delta)
            )
        console.print(extra)
    entries = sum(ledger.entries for ledger in report.ledgers)
    signed = sum(ledger.signed for ledger in report.ledgers)
    distributed = report.distributed
    if distributed is not None:
        console.print(
            f"Distributed DP (client-level, against the coordinator): {distributed.releases} "
            f"releases, epsilon {distributed.recorded_epsilon:.4f} recorded, "
            f"{distributed.recomputed_epsilon:.4f} recomputed independently at delta "
            f"{distributed.delta:g}"
            + (
                ""
                if distributed.budget_epsilon is None
                else f", budget {distributed.budget_epsilon:g}"
            )
        )
    if report.ok:
        console.print(
            f"[green]verified[/green]: {len(report.ledgers)} ledgers, {entries} entries "
            f"({signed} signed); hash "
            "chains intact, every epsilon follows from its recorded mechanisms, none below "
            "the independent PLD recompute"
        )
    else:
        for problem in report.all_problems():
            console.print(f"[red]FAILED[/red] {problem}")
    for plot in report.plots:
        console.print(f"plot: {plot}")


@audit_app.command("empirical")
def audit_empirical(
    scenario: Annotated[str, typer.Option(help="Scenario whose training rows are audited.")] = (
        "medical"
    ),
    dataset: Annotated[str, typer.Option(help="Dataset of the scenario.")] = "flchain",
    canaries: Annotated[int, typer.Option(help="Canary records (each in with p = 1/2).")] = 1000,
    guesses: Annotated[
        int, typer.Option(help="Guesses per side: IN for the k best-fitted, OUT for the k worst.")
    ] = 50,
    epochs: Annotated[int, typer.Option(help="Training epochs of the audited run.")] = 30,
    epsilon: Annotated[float, typer.Option(help="Target epsilon of the DP-SGD run.")] = 1.0,
    delta: Annotated[float, typer.Option(help="DP delta (also the bound's delta).")] = 1e-5,
    no_dp: Annotated[
        bool, typer.Option("--no-dp", help="Non-private control: shows the audit has teeth.")
    ] = False,
    model: Annotated[
        str, typer.Option(help="wide-mlp (memorises: a stronger audit) or a registry model.")
    ] = "wide-mlp",
    seed: Annotated[
        int | None, typer.Option(help="Secret inclusion seed (default: drawn from the OS).")
    ] = None,
    claimed_epsilon: Annotated[
        float | None,
        typer.Option(
            help="Hold the bound against this claimed epsilon instead of the accountant's "
            "(with --no-dp: a negative control, which must fail)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """One-run empirical audit (Steinke, Nasr, Jagielski 2023): a lower bound on epsilon.

    Exits with code 1 when the lower bound exceeds the accountant's epsilon, or the
    claimed one (an under-reported epsilon or a bug).
    """
    from dataclasses import replace

    import torch

    from fedmodel.canaries import run_empirical_audit
    from fedmodel.config import RunConfig
    from fedmodel.datasets.scenarios import client_partitions
    from fedmodel.errors import ConfigError

    if canaries < 2 or not 0 < 2 * guesses <= canaries:
        raise ConfigError(f"--guesses must be between 1 and canaries/2 (got {guesses})")
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1 (got {epochs})")
    if claimed_epsilon is not None and not claimed_epsilon >= 0:
        raise ConfigError(f"--claimed-epsilon must be 0 or more (got {claimed_epsilon})")
    config = RunConfig(
        scenario=scenario,
        dataset=dataset,
        clients=1,
        dp="off" if no_dp else "sample",
        epsilon=epsilon,
        delta=delta,
    )
    torch.set_num_threads(1)
    data = client_partitions(config)[0]
    with console.status(f"Training once with {canaries} canaries ({epochs} epochs)..."):
        result = run_empirical_audit(config, data, canaries, guesses, epochs, seed, model)
    result = replace(result, claimed_epsilon=claimed_epsilon)
    if as_json:
        console.out(json.dumps(result.to_json(), indent=2))
    else:
        accountant = (
            "no DP: no accountant"
            if result.accountant_epsilon is None
            else f"accountant epsilon {result.accountant_epsilon:.3f} (RDP), "
            f"{result.pld_epsilon:.3f} (PLD)"
        )
        console.print(
            f"epsilon lower bound {result.epsilon_lower_bound:.3f} at {1 - result.beta:.0%} "
            f"confidence (m={result.canaries}, guesses={result.guesses}, "
            f"correct={result.correct}, delta={result.delta:g}); ceiling with these guesses "
            f"{result.ceiling:.2f}; {accountant}"
        )
        if claimed_epsilon is not None:
            console.print(f"claimed epsilon {claimed_epsilon:g} (tested instead)")
        console.print(f"threat model: {result.threat_model}")
    if result.accounting_bug:
        if not as_json:  # the JSON says so itself (accounting_bug), and stays parseable
            tested = "accountant's" if claimed_epsilon is None else "claimed"
            console.print(
                f"[red]FAILED[/red] the lower bound {result.epsilon_lower_bound:.3f} exceeds "
                f"the {tested} epsilon {result.tested_epsilon:.3f}"
            )
        raise typer.Exit(code=ExitCode.FAILED)


def _number(value: float | None) -> str:
    """A PLD epsilon, or "-" where PLD does not apply (a distributed-DP charge)."""
    return "-" if value is None else f"{value:.4f}"
