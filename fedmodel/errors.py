"""User-facing errors: each one becomes a single line and a non-zero exit code in the CLI.

Bugs are not FedModelErrors; they raise normally so the traceback reaches a developer.
"""


class FedModelError(Exception):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""

    exit_code: int = 1


class ConfigError(FedModelError):
    """An invalid option or run-config value."""

    exit_code = 2


class DataError(FedModelError):
    """Data that cannot be loaded or partitioned as asked."""

    exit_code = 3


class SimulationError(FedModelError):
    """The simulation engine failed to start or the run did not complete."""

    exit_code = 4
