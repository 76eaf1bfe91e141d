"""The Flower App definition handed to `flwr run`: installed apps and the run config.

The App is a generated pyproject.toml naming the ServerApp and ClientApp and carrying
the resolved run config; the code itself comes from the installed package, so a run
works the same from a checkout and from a wheel. Components are named as strings: the
library imports no role.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedmodel.config import RunConfig


def write_flower_app(
    app_dir: Path,
    config: RunConfig,
    name: str = "simulation",
    server_app: str = "server.app:app",
    client_app: str = "client.app:app",
) -> None:
    """A Flower App definition whose components are installed apps ("module:attribute").

    `name` (letters, digits, hyphens) tells simulation and deployment runs apart in
    Flower's run list: the app is `fedmodel/fedmodel-<name>`. The components default to
    the deployed apps; a simulation passes its own.
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
        f'serverapp = "{server_app}"',
        f'clientapp = "{client_app}"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in config.to_run_config().items()]
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")


@contextmanager
def staged_flower_app(config: RunConfig, **components: str) -> Iterator[Path]:
    """The App written to a temporary directory for the length of `flwr run`, then removed.

    Its run config must hold absolute paths (the ServerApp runs from another directory),
    so it stays out of the run directory, which holds only relative ones and can be moved
    or shared.
    """
    with tempfile.TemporaryDirectory(prefix="fedmodel-app-") as app_dir:
        write_flower_app(Path(app_dir), config, **components)
        yield Path(app_dir)


def _toml_value(value: int | float | bool | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)
