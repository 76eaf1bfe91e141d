"""Stopping a deployed run from the console, as Ctrl-C on its `fedmodel run` would.

A run directory's config.json says whether the run was deployed and on which federation;
its engine log names the run the SuperLink started, which server/launch.py asks the
SuperLink to stop. A simulation has no SuperLink to ask: its own process stops it.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedmodel.config.run_config import RunConfig
from fedmodel.console.federation import is_federation_directory
from fedmodel.run_directory import CONFIG_FILE, ENGINE_DIR, SUMMARY_FILE, RunSummary
from server.launch import stop_submitted_run, submitted_run_id
from server.superlink import Federation, ServerError, is_healthy


def stop_deployed_run(run_dir: Path) -> int:
    """Ask the run's SuperLink to stop the run in `run_dir`; return the SuperLink's run id.

    ServerError (one line) when the run is not a started, unfinished deployed run.
    """
    config_path = run_dir / CONFIG_FILE
    try:
        stored = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise ServerError(
            f"{config_path} is missing or not JSON, so the console cannot tell how the run runs"
        ) from None
    config = RunConfig.from_run_config(stored).located_in(run_dir)
    if config.scenario != "deployment":
        raise ServerError(
            f"run '{run_dir.name}' is a simulation ({config.scenario}): stop it with Ctrl-C "
            "where it runs"
        )
    federation_dir = Path(config.federation_dir) if config.federation_dir else None
    if federation_dir is None or not is_federation_directory(federation_dir):
        raise ServerError(
            f"{config_path}: federation_dir ({federation_dir}) is not a federation directory; "
            "stop the run with Ctrl-C on its 'fedmodel run'"
        )
    if (run_dir / SUMMARY_FILE).is_file() and RunSummary.load(run_dir).completed:
        raise ServerError(f"run '{run_dir.name}' has already finished; nothing to stop")
    run_log = run_dir / ENGINE_DIR / "flwr-run.log"
    run_id = submitted_run_id(run_log)
    if run_id is None:
        raise ServerError(f"{run_log} shows no run started on the SuperLink (yet); nothing to stop")
    federation = Federation.load(federation_dir)
    if not is_healthy(federation):  # as launch_run checks before it submits
        raise ServerError(
            f"no SuperLink is answering for {federation_dir} to stop '{run_dir.name}'; "
            f"check it with 'fedmodel server status --dir {federation_dir}'"
        )
    stop_submitted_run(federation, run_log)
    return run_id
