"""User-facing errors: each one becomes a single line and a non-zero exit code in the CLI.

Bugs are not FedModelErrors; they raise normally so the traceback reaches a developer.
Every exit code the CLI can end with is a member of `ExitCode`, one meaning per number,
so scripts can tell a spent budget from a broken certificate.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """How a `fedmodel` command ended; `description` says what the number means."""

    description: str

    def __new__(cls, value: int, description: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    SUCCESS = 0, "The command did what it was asked."
    FAILED = 1, "Failed: a check found a problem (audit, server status), or no specific code fits."
    USAGE = 2, "Invalid command line, option, run config, owner policy or task; nothing started."
    DATA = 3, "Data that cannot be loaded or partitioned as asked."
    SIMULATION = 4, "The simulation engine failed to start or the run did not complete."
    CERTIFICATE = 5, "A certificate or key file is missing, unreadable or of the wrong kind."
    BUDGET_EXHAUSTED = 6, "The next round would take a dataset past its owner's epsilon budget."
    SUPERNODE = 7, "The SuperNode could not join the federation or stopped with an error."
    AUDIT_LOG = 8, "An audit log is malformed, altered, truncated or not authentic."
    KEY_EXISTS = 9, "A key file exists and the command was not asked to replace it."
    JOIN_BUNDLE = 10, "A join bundle is unreadable, for another node, or from an unpinned CA."
    LEDGER = 11, "A privacy ledger cannot be opened or read (not a FedModel ledger, corrupt)."
    SERVER = 12, "The federation directory or its SuperLink is not in the state a command needs."
    RUN_DIRECTORY = 13, "A run's summary.json is unreadable, lacks a key or has an unknown one."
    MODEL_FILE = 14, "A model file is missing, not safetensors and JSON, or from a newer FedModel."
    INTERRUPTED = 130, "Interrupted (Ctrl-C or SIGTERM); processes the run started were stopped."


class FedModelError(Exception):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""

    exit_code: ExitCode = ExitCode.FAILED


class ConfigError(FedModelError):
    """An invalid option or run-config value."""

    exit_code = ExitCode.USAGE


class TaskError(ConfigError):
    """A user's Task that cannot be imported, is not a Task, or cannot train under DP."""


class DataError(FedModelError):
    """Data that cannot be loaded or partitioned as asked."""

    exit_code = ExitCode.DATA


class SimulationError(FedModelError):
    """The simulation engine failed to start or the run did not complete."""

    exit_code = ExitCode.SIMULATION
