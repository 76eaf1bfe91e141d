"""The deployed apps carry no simulation hooks; the harness composes its own around them."""

import subprocess
import sys
from pathlib import Path

from client.app import app as deployed_client_app
from simulations.apps import client_app as simulated_client_app
from simulations.attacks import simulated_attack_mod


def test_the_deployed_apps_import_neither_the_harness_nor_the_dataset_catalogue() -> None:
    """The data of a deployed run is the nodes': the roles' apps never choose it."""
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, server.app, client.app, client.secagg_app\n"
            "print(sorted(m for m in sys.modules "
            "if m.startswith(('simulations', 'fedmodel.datasets'))))",
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"


def test_only_the_simulations_client_app_carries_the_attack_mod() -> None:
    """A coordinator cannot have a deployed node poison its reply: the mod is not there."""
    assert simulated_attack_mod not in deployed_client_app._mods
    assert simulated_attack_mod in simulated_client_app._mods
