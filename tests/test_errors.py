"""The exit-code table: one meaning per number, every user-facing error on it."""

from __future__ import annotations

import importlib
import pkgutil
from collections import defaultdict

from fedmodel.errors import ConfigError, ExitCode, FedModelError

PACKAGES = ("fedmodel", "server", "client", "simulations")
# Mistakes in what the user asked for: one meaning (fix the command line or its files)
SAME_MEANING = {ExitCode.USAGE: {"ConfigError", "PolicyError", "UnknownTask"}}


def _all_error_classes() -> list[type[FedModelError]]:
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            if not module.name.endswith("__main__"):  # runs the CLI
                importlib.import_module(module.name)
    found, pending = [], [FedModelError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_each_exit_code_has_its_own_number_and_a_description() -> None:
    assert len(ExitCode.__members__) == len(ExitCode)  # no aliases
    assert all(code.description.endswith(".") for code in ExitCode)
    assert (ExitCode.SUCCESS, ExitCode.FAILED, ExitCode.USAGE, ExitCode.INTERRUPTED) == (
        0,
        1,
        2,
        130,
    )


def test_no_two_errors_share_an_exit_code_unless_they_mean_the_same_thing() -> None:
    by_code: dict[ExitCode, set[str]] = defaultdict(set)
    for cls in _all_error_classes():
        assert isinstance(cls.exit_code, ExitCode), f"{cls.__name__} exits off the table"
        if "exit_code" in vars(cls):  # a subclass without its own code refines its parent
            by_code[cls.exit_code].add(cls.__name__)
    shared = {code: names for code, names in by_code.items() if len(names) > 1}
    assert shared == SAME_MEANING
    assert ConfigError.exit_code == ExitCode.USAGE
