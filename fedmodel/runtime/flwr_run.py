"""`flwr run --stream`: start it, keep its log, and turn its progress lines into rows.

The ServerApp logs one PROGRESS_MARKER line per completed round; simulation and
deployment runs both follow a run through these lines, whichever engine carries them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmodel.runtime.processes import executable

PROGRESS_MARKER = "fedmodel-progress "  # then the round's row as JSON

ProgressCallback = Callable[[dict[str, Any]], None]


def progress_line(row: dict[str, Any], measures: str, elapsed_s: float) -> str:
    """One completed round as the CLIs print it: round, `measures`, max epsilon, and the
    time since the run started (not the round's own duration, so it says "elapsed")."""
    epsilon = "" if row["max_epsilon"] is None else f"  max epsilon {row['max_epsilon']:.3f}"
    return f"round {row['round']}/{row['rounds']}  {measures}{epsilon}  {elapsed_s:.0f} s elapsed"


def progress_row(line: str) -> dict[str, Any] | None:
    """The round row a log line carries, if it is a progress line."""
    if PROGRESS_MARKER not in line:
        return None
    row: dict[str, Any] = json.loads(line.split(PROGRESS_MARKER, 1)[1])
    return row


def flwr_run_command(app_dir: Path, connection: str, *options: str) -> list[str]:
    """`flwr run` of the App in `app_dir` on SuperLink connection `connection`, logs streamed.

    `local` is Flower's connection to a local SuperLink (the simulation's, with
    `--federation-config` among `options`); a deployment names its own connection.
    """
    return [executable("flwr"), "run", str(app_dir), connection, "--stream", *options]


def stream_run_output(
    command: list[str],
    engine_dir: Path,
    environment: dict[str, str],
    on_progress: ProgressCallback,
    on_log_line: Callable[[str], None] | None,
) -> int:
    """Run a `flwr run --stream` command; log it to engine_dir/flwr-run.log; parse progress.

    Returns the command's exit code. Shared by simulation and deployment runs.
    """
    with (engine_dir / "flwr-run.log").open("w") as log_file:
        process = subprocess.Popen(
            command,
            cwd=engine_dir,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert process.stdout is not None
        try:
            for line in process.stdout:
                log_file.write(line)
                log_file.flush()
                if on_log_line is not None:
                    on_log_line(line.rstrip("\n"))
                if (row := progress_row(line)) is not None:
                    on_progress(row)
            process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return int(process.returncode)
