"""The `fedmodel` command line: one line per user mistake, never a traceback."""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

import click
import typer
from rich.console import Console

from fedmodel.cli.audit import audit_app
from fedmodel.cli.client import client_app
from fedmodel.cli.console import console_command
from fedmodel.cli.model import export_command, predict_command
from fedmodel.cli.run import run_command
from fedmodel.cli.server import server_app
from fedmodel.cli.simulate import simulate_app
from fedmodel.cli.sweep import sweep_command
from fedmodel.errors import ExitCode, FedModelError

app = typer.Typer(
    name="fedmodel",
    help="Federated, differentially private training on Flower and Opacus.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(simulate_app, name="simulate")
app.add_typer(server_app, name="server")  # issue 4: federation server
app.add_typer(client_app, name="client")  # issue 4: data owner's node
app.command("run")(run_command)  # issue 4: train on enrolled nodes
app.add_typer(audit_app, name="audit")
app.command("predict")(predict_command)  # issue 16: use the trained model
app.command("export")(export_command)
app.command("console")(console_command)  # issue 19: the operator's and auditor's console
app.command(  # issue 20: tune per epsilon; simulate's other options pass through
    "sweep", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)(sweep_command)


def main() -> None:
    """Console entry point: turn user mistakes into one line and an exit code."""
    signal.signal(signal.SIGTERM, _interrupt)  # clean up engine processes on SIGTERM too
    try:
        # Typer turns KeyboardInterrupt into exit code 130 and returns exit codes here.
        code = app(standalone_mode=False)
    except click.UsageError as error:
        _fail(_usage_message(error), ExitCode.USAGE)
    except FedModelError as error:
        _fail(str(error), error.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        code = ExitCode.INTERRUPTED
    if code == ExitCode.INTERRUPTED:
        _fail("interrupted; processes started for this run were stopped", ExitCode.INTERRUPTED)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _usage_message(error: click.UsageError) -> str:
    context = error.ctx
    if (
        isinstance(error, click.exceptions.UsageError)
        and "No such command" in error.format_message()
        and context is not None
        and context.command.name == "simulate"
    ):
        name = error.format_message().split("'")[1]
        choices = ", ".join(context.command.list_commands(context))  # type: ignore[attr-defined]
        return f"unknown scenario '{name}'; choose one of: {choices}"
    hint = f" (see '{context.command_path} --help')" if context is not None else ""
    return f"{error.format_message()}{hint}"


def _fail(message: str, code: int) -> NoReturn:
    Console(stderr=True, highlight=False, emoji=False).print(
        f"[red]error:[/red] {message}", soft_wrap=True
    )
    sys.exit(code)
