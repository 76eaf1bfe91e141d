"""What each run-config key means: its choices, its section and its help text.

The CLI generates its options from this (fedmodel/cli/options.py) and the docs list it,
so a key's help, default and choices are written once, next to its declaration.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, TypeVar

DpMode = Literal["off", "sample", "client", "both", "distributed"]
"""off | sample-level DP-SGD on clients | client-level DP on the server | both |
client-level DP added by the clients under SecAgg+ (distributed DP)."""
PartitionScheme = Literal["iid", "dirichlet", "shard", "pathological"]
ModelName = Literal["mlp", "logreg", "cnn"]
"""The names of fedmodel/models.py's registry (a test keeps both equal)."""
MODEL_USES: dict[ModelName, str] = {
    "mlp": "tables: hidden layers 32-16",
    "logreg": "tables: one linear layer",
    "cnn": "28x28 images: Conv 32-64-64 + Dense 64",
}
"""What each registered model is for, without importing torch: --model's help lists them all."""
AggregatorName = Literal[
    "fedavg",
    "fedprox",
    "fedadam",
    "fedavgm",
    "median",
    "trimmed-mean",
    "krum",
    "multikrum",
    "bulyan",
]
AttackName = Literal["none", "sign-flip", "scaled", "gaussian", "nan"]
EvaluationMethod = Literal["mean", "median"]
"""Deployment: how the nodes' scores of a global model combine."""
Task = Literal["binary", "multiclass", "regression"]
"""What a table's label is: 0/1, class indices, or a continuous value."""

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
"""--device is not a closed list (cuda:N names any GPU), so it is matched, not enumerated."""


class Section(StrEnum):
    """The group a key belongs to; the value is the CLI help panel's title."""

    DATA = "Data"
    FEDERATION = "Federation"
    TRAINING = "Training"
    PRIVACY = "Privacy"
    CLIENT_DP = "Client-level DP on the server (--dp client or both)"
    ROBUSTNESS = "Robustness"
    DISTRIBUTED_DP = "Client-level DP under SecAgg+ (--dp distributed)"
    SECAGG = "Secure aggregation (SecAgg+)"
    ENGINE = "Engine and hardware"
    OUTPUT = "Output and resume"
    RUN = "Run identity (set by FedModel, not an option)"


T = TypeVar("T")


def key(default: T, section: Section, help: str, off_switch: str = "") -> T:
    """Declare a run-config field: its default, its section and its one-line help.

    `off_switch` names a boolean's negative flag (e.g. --central-fixed); without one the
    boolean is a plain switch.
    """
    metadata = {"section": section, "help": help, "off_switch": off_switch}
    return typing.cast(T, dataclasses.field(default=default, metadata=metadata))


@dataclass(frozen=True)
class ConfigKey:
    """One run-config key as the CLI and the docs see it."""

    name: str
    kind: type  # int, float, bool or str: the value's type in Flower's run config
    default: Any
    help: str
    section: Section
    choices: tuple[str, ...]  # empty: any value of `kind` that validation accepts
    off_switch: str

    @property
    def flag(self) -> str:
        """The command-line option and the run-config key: the name with `-` for `_`."""
        return "--" + self.run_config_key

    @property
    def run_config_key(self) -> str:
        return self.name.replace("_", "-")


def describe_keys(config_class: type) -> dict[str, ConfigKey]:
    """Every field of a dataclass declared with `key`, in declaration order."""
    hints = typing.get_type_hints(config_class)
    described = {}
    for field in dataclasses.fields(config_class):
        hint = hints[field.name]
        literal = typing.get_origin(hint) is Literal
        described[field.name] = ConfigKey(
            name=field.name,
            kind=str if literal else hint,
            default=field.default,
            help=field.metadata["help"],
            section=field.metadata["section"],
            choices=typing.get_args(hint) if literal else (),
            off_switch=field.metadata["off_switch"],
        )
    return described
