"""`fedmodel run`: submit the FedModel app to a running federation and follow it.

The Flower App handed to `flwr run` is the same generated pyproject that simulation
uses (fedmodel.runtime.flower_app.staged_flower_app), with scenario "deployment": the ServerApp
then asks the nodes to describe their data, trains on them and evaluates on them.
The run directory is written by the ServerApp, on this (the SuperLink's) host.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from fedmodel.config import RunConfig
from fedmodel.run_directory import CONFIG_FILE, ENGINE_DIR, RunSummary, write_json_atomic
from fedmodel.runtime.flower_app import staged_flower_app
from fedmodel.runtime.flwr_run import ProgressCallback, flwr_run_command, stream_run_output
from fedmodel.runtime.processes import executable, plain_lines
from server.superlink import CONNECTION, Federation, ServerError, is_healthy, server_environment


def launch_run(
    federation: Federation,
    config: RunConfig,
    run_dir: Path,
    on_progress: ProgressCallback,
    on_log_line: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run `config` on the federation's enrolled nodes; return its summary.json."""
    if not is_healthy(federation):
        raise ServerError(
            f"no SuperLink is answering for {federation.directory}; start it with "
            f"'fedmodel server start --dir {federation.directory}'"
        )
    engine_dir = run_dir / ENGINE_DIR
    engine_dir.mkdir(parents=True, exist_ok=True)
    config = config.replace(output_dir=str(run_dir.absolute()))
    if not config.resume:  # what `fedmodel run --resume` starts again from
        write_json_atomic(run_dir / CONFIG_FILE, config.relative_to(run_dir).to_run_config())
    try:
        with staged_flower_app(config, name="deployment") as app_dir:
            code = stream_run_output(
                flwr_run_command(app_dir, CONNECTION),
                engine_dir, server_environment(federation), on_progress, on_log_line,
            )  # fmt: skip
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the ServerApp would go on unfollowed
        stop_submitted_run(federation, engine_dir / "flwr-run.log")
        raise
    summary = RunSummary.of_completed_run(run_dir)
    if code != 0 or summary is None:
        cause = last_exception((engine_dir / "flwr-run.log").read_text(errors="replace"))
        raise ServerError(
            f"the run did not complete (flwr exit code {code}{'; ' + cause if cause else ''}); "
            f"its log is {engine_dir / 'flwr-run.log'} and the server's is "
            f"{federation.path('superlink.log')}"
        )
    return summary


_STARTED_RUN = re.compile(r"Successfully started run (\d+)")


def submitted_run_id(run_log: Path) -> int | None:
    """The SuperLink's id of the run `flwr run` reported starting in `run_log`, if it did."""
    started = _STARTED_RUN.search(run_log.read_text(errors="replace")) if run_log.exists() else None
    return None if started is None else int(started.group(1))


def stop_submitted_run(federation: Federation, run_log: Path) -> None:
    """Ask the SuperLink to stop the run `flwr run` reported starting, if it got that far."""
    run_id = submitted_run_id(run_log)
    if run_id is None:
        return
    subprocess.run(
        [executable("flwr"), "stop", str(run_id), CONNECTION],
        cwd=run_log.parent, env=server_environment(federation),
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception): .+$")


def last_exception(log_text: str) -> str | None:
    """The ServerApp's last `SomeError: message` line in a run's log, if it raised."""
    lines = plain_lines(log_text)
    return next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), None)
