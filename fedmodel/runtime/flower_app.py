"""The Flower App definition handed to `flwr run`: the installed ServerApp and ClientApp.

The App is a generated pyproject.toml naming our components and carrying the resolved
run config; the code itself comes from the installed package, so a run works the same
from a checkout and from a wheel. Components are named as strings: the library imports
no role.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedmodel.config import RunConfig


def write_flower_app(app_dir: Path, config: RunConfig, name: str = "simulation") -> None:
    """A Flower App definition whose components are the installed ServerApp and ClientApp.

    `name` (letters, digits, hyphens) tells simulation and deployment runs apart in
    Flower's run list: the app is `fedmodel/fedmodel-<name>`.
    """
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "fedmodel-{name}"',
        'version = "1.0.0"',
        f'description = "FedModel {name} run"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedmodel"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "server.app:app"',
        f'clientapp = "{client_app_reference(config)}"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in config.to_run_config().items()]
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")


def client_app_reference(config: RunConfig) -> str:
    """The ClientApp for `config`: SecAgg+ needs Flower's legacy client (client/secagg_app.py)."""
    return "client.secagg_app:app" if config.secagg else "client.app:app"


def _toml_value(value: int | float | bool | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)
