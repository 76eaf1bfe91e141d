"""Which Task a run trains: a built-in scenario's, or a user's named by reference.

A reference is `module:attribute` (the module importable on this machine, e.g. from a
directory on PYTHONPATH) or the name of an installed task: a `fedmodel.tasks` packaging
entry point, which is how a node owner installs a task with pip. The attribute is a
`Task`, or a function that takes the run's `RunConfig` and returns one (to read options
such as `--clients` or `--seed`). Nothing is downloaded and no coordinator-sent code
runs: the reference resolves only to code installed here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from fedmodel.config import TASK_ENTRY_POINTS, TASK_SCENARIO, RunConfig
from fedmodel.errors import ConfigError, TaskError
from fedmodel.task import Task
from fedmodel.validation import validation_task


def installed_task_references() -> dict[str, str]:
    """Installed tasks by name: each `fedmodel.tasks` entry point's `module:attribute`."""
    return {point.name: point.value for point in entry_points(group=TASK_ENTRY_POINTS)}


def import_reference(reference: str) -> Any:
    """The object `module:attribute` (or an installed task's name) refers to."""
    installed = installed_task_references()
    if reference in installed:
        reference = installed[reference]
    module_name, colon, attribute = reference.partition(":")
    if not colon or not module_name or not attribute:
        names = ", ".join(sorted(installed)) or "none"
        raise TaskError(
            f"task '{reference}' is neither module:attribute nor an installed task "
            f"(installed: {names})"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TaskError(
            f"cannot import task module '{module_name}' ({error}); put its directory on "
            "PYTHONPATH or pip install its package"
        ) from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise TaskError(f"module '{module_name}' has no attribute '{attribute}'") from None


def task_from_reference(reference: str, config: RunConfig) -> Task:
    """The Task `reference` names, built for `config` if it is a factory."""
    found = import_reference(reference)
    if callable(found) and not isinstance(found, Task):
        try:
            found = found(config)
        except Exception as error:  # noqa: BLE001 - the user's function: say what it raised
            raise TaskError(
                f"'{reference}' is not a fedmodel.Task, and calling it with the run's "
                f"RunConfig raised {type(error).__name__}: {error}"
            ) from None
    if not isinstance(found, Task):
        raise TaskError(
            f"'{reference}' is a {type(found).__name__}, not a fedmodel.Task "
            "(or a function of the RunConfig that returns one)"
        )
    return found


def resolve_clients(config: RunConfig, task: Task, clients_given: bool) -> RunConfig:
    """`config` with `clients` set to the task's number of sites, when its data fixes it
    (natural sites); an explicit --clients that disagrees is an error, not a silent change.
    """
    if task.num_sites is None:
        return config
    if clients_given and config.clients != task.num_sites:
        raise ConfigError(
            f"{config.dataset} is split by its natural sites ({task.num_sites} with enough "
            f"rows to train under DP); --clients {config.clients} cannot change that: "
            "leave --clients out"
        )
    return config.replace(clients=task.num_sites)


@lru_cache(maxsize=4)
def load_task(config: RunConfig) -> Task:
    """The Task `config` trains (cached: every simulated client of a process asks)."""
    if config.scenario == TASK_SCENARIO:
        task = task_from_reference(config.task_ref, config)
    else:
        from fedmodel.datasets.tabular_task import tabular_task

        task = tabular_task(config)
    if config.fix_model:
        task = dataclasses.replace(task, model=FixedModel(task.model))
    if config.validation_fraction > 0:
        task = validation_task(task, config.validation_fraction, task.num_sites or config.clients)
    return task


@dataclass(frozen=True)
class FixedModel:
    """A model factory for `--fix-model`: the task's own models with Opacus's
    DP-compatible replacement layers (ModuleValidator.fix: BatchNorm to GroupNorm, nn.LSTM
    to DPLSTM...). `unfixed` is kept so fedmodel.task_checks can say what was replaced."""

    unfixed: Callable[[], nn.Module]

    def __call__(self) -> nn.Module:
        from opacus.validators import ModuleValidator

        return ModuleValidator.fix(self.unfixed())
