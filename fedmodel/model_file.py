"""The model file: a trained model and everything needed to score new data, without pickle.

A model file is a directory of two files, readable without the run directory around it:

- `model.safetensors`: the weights. safetensors is a JSON header and raw tensor bytes, so
  reading it runs no code; a pickled torch checkpoint (`torch.load`) could run any.
- `model.json`: `format_version`, the task (name, version, and the reference the model
  is rebuilt from: the built-in table model, or a user task's `module:attribute` or
  installed name), the run config, the table schema (columns, encoding statistics,
  label classes: fedmodel.table_schema), the epsilon each data owner spent on the run,
  the run id and the round.

Every run writes its final model to `model/` in its run directory (and, with
`--save-round-models`, each round's to `models/round-NNNN/`). Loading it into a module is
fedmodel.trained_model's job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmodel import __version__
from fedmodel.config import TABULAR_TASK, TASK_SCENARIO, RunConfig
from fedmodel.errors import ExitCode, FedModelError
from fedmodel.run_directory import MODEL_DIR, RunSummary, client_level_mechanism
from fedmodel.table_schema import TableSchema

if TYPE_CHECKING:
    import torch

    from fedmodel.task import Task

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"


class ModelFileError(FedModelError):
    """A model file that is missing, unreadable, not FedModel's or from a newer FedModel."""

    exit_code = ExitCode.MODEL_FILE


@dataclass(frozen=True)
class ModelMetadata:
    """model.json: what the weights are, how to rebuild the module and feed it, what they cost.

    `outputs` is the task's kind ("binary": one logit, "multiclass": one per class,
    "regression": one value, "custom": the user's metrics, outputs as the model gives
    them). `privacy` holds the guarantee the released model carries: the epsilon each
    owner's ledger spent on this run (sample-level DP) and the client-level epsilon.
    """

    task_name: str
    task_version: str
    task_reference: str
    outputs: str
    run_config: dict[str, Any]
    table: TableSchema | None
    privacy: dict[str, Any]
    run_id: str
    round: int
    fedmodel_version: str = __version__
    format_version: int = FORMAT_VERSION

    @property
    def config(self) -> RunConfig:
        """The run config the model was trained under (its model factory's argument)."""
        return RunConfig.from_run_config(self.run_config)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "fedmodel_version": self.fedmodel_version,
            "task": {
                "name": self.task_name,
                "version": self.task_version,
                "reference": self.task_reference,
            },
            "outputs": self.outputs,
            "table": None if self.table is None else self.table.to_json(),
            "privacy": self.privacy,
            "run_id": self.run_id,
            "round": self.round,
            "run_config": self.run_config,
        }

    @classmethod
    def from_json(cls, raw: Any, source: Path) -> ModelMetadata:
        """Read `to_json`'s form; a newer format or a malformed file is a ModelFileError."""
        if not isinstance(raw, Mapping) or not isinstance(raw.get("format_version"), int):
            raise ModelFileError(f"{source} is not a FedModel model file (no format_version)")
        if raw["format_version"] > FORMAT_VERSION:
            raise ModelFileError(
                f"{source} is model format {raw['format_version']}, from a newer FedModel "
                f"({raw.get('fedmodel_version', '?')}); this one ({__version__}) reads up to "
                f"format {FORMAT_VERSION}: upgrade fedmodel"
            )
        try:
            task = raw["task"]
            return cls(
                task_name=str(task["name"]),
                task_version=str(task["version"]),
                task_reference=str(task["reference"]),
                outputs=str(raw["outputs"]),
                run_config=dict(raw["run_config"]),
                table=None if raw["table"] is None else TableSchema.from_json(raw["table"]),
                privacy=dict(raw["privacy"]),
                run_id=str(raw["run_id"]),
                round=int(raw["round"]),
                fedmodel_version=str(raw["fedmodel_version"]),
                format_version=int(raw["format_version"]),
            )
        except (KeyError, TypeError, ValueError, FedModelError) as error:
            raise ModelFileError(f"{source} is malformed ({error!r})"[:300]) from None


def model_metadata(
    task: Task, config: RunConfig, summary: RunSummary, server_round: int
) -> ModelMetadata:
    """The metadata of `task`'s model after `server_round` of the run `summary` records."""
    if task.name == TABULAR_TASK:
        reference = TABULAR_TASK
    elif config.scenario == TASK_SCENARIO:
        reference = config.task_ref
    else:
        reference = config.app_task  # a deployed run of an installed task
    return ModelMetadata(
        task_name=task.name,
        task_version=task.version,
        task_reference=reference,
        outputs=task.metrics if isinstance(task.metrics, str) else "custom",
        # paths as the run directory stores them: the file names no path of this machine
        run_config=dict(config.relative_to(Path(config.output_dir)).to_run_config()),
        table=task.table,
        privacy=privacy_spent(summary, server_round),
        run_id=config.run_uid or Path(config.output_dir).name,
        round=server_round,
    )


def privacy_spent(summary: RunSummary, server_round: int) -> dict[str, Any]:
    """The epsilon each owner had spent on the run by `server_round` (sample-level DP,
    from the owners' reports), and the client-level epsilon of the whole run and its
    mechanism (who added the noise: the coordinator, or the clients under SecAgg+), if any."""
    owners: dict[str, float | None] = {}
    for client in summary.clients:
        spent = [eps for rnd, eps in client.get("epsilon_by_round", []) if rnd <= server_round]
        owner = str(client.get("node") or f"client {client['client']}")
        owners[owner] = spent[-1] if spent else None
    central = summary.client_level_dp
    return {
        "dp_mode": summary.dp_mode,
        "delta": summary.delta,
        "accountant": summary.accountant,
        "epsilon_per_owner": owners if summary.dp else {},
        "client_level_epsilon": None if central is None else central.get("epsilon"),
        "client_level_mechanism": None if central is None else client_level_mechanism(central),
    }


def save_model_file(
    directory: Path, state_dict: Mapping[str, torch.Tensor], metadata: ModelMetadata
) -> Path:
    """Write the weights, then model.json, each atomically: a reader finds no model.json
    beside half-written weights."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.detach().cpu().contiguous().clone() for name, tensor in state_dict.items()
    }
    partial = directory / (WEIGHTS_FILE + ".partial")
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, directory / WEIGHTS_FILE)
    partial = directory / (METADATA_FILE + ".partial")
    partial.write_text(json.dumps(metadata.to_json(), indent=2, allow_nan=False) + "\n")
    os.replace(partial, directory / METADATA_FILE)
    return directory


def model_directory(path: Path) -> Path:
    """The model file `path` names: a model directory, its model.json, or a run directory
    (its final model)."""
    if path.is_file() and path.name in (METADATA_FILE, WEIGHTS_FILE):
        path = path.parent
    if (path / MODEL_DIR / METADATA_FILE).is_file():
        path = path / MODEL_DIR
    if not (path / METADATA_FILE).is_file():
        raise ModelFileError(
            f"{path} holds no model file ({METADATA_FILE}); pass a run directory of a run "
            f"that finished, or its {MODEL_DIR}/ directory"
        )
    return path


def read_model_file(path: Path) -> tuple[ModelMetadata, dict[str, torch.Tensor]]:
    """(metadata, weights) of the model file at `path`; nothing in it is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = model_directory(path)
    source = directory / METADATA_FILE
    try:
        raw = json.loads(source.read_text())
    except (OSError, ValueError) as error:
        raise ModelFileError(f"{source}: cannot read it ({error})") from None
    metadata = ModelMetadata.from_json(raw, source)
    weights = directory / WEIGHTS_FILE
    try:
        return metadata, load_file(str(weights))
    except (OSError, SafetensorError) as error:
        raise ModelFileError(
            f"{weights} is not a safetensors file ({error}); FedModel never unpickles weights"
        ) from None
