"""A trained model, ready to score: `fedmodel.load_model(PATH)`, and what `fedmodel predict` runs.

The module is rebuilt from the model file alone (fedmodel.model_file): the built-in table
model from the model registry (no data, no user code), a user task's from the task's own
`model()` factory, found by the reference the file records, so that task's package must
be installed (or its module importable) where the model is loaded. Scores are
probabilities for classifiers (of class "1" for a binary label, one per class in the
file's class order for more) and the prediction itself for a regression.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedmodel.config import TABULAR_TASK
from fedmodel.errors import TaskError
from fedmodel.evaluation import predict as model_outputs
from fedmodel.model_file import ModelFileError, ModelMetadata, read_model_file
from fedmodel.table_schema import TableSchema

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class TrainedModel:
    """A model file's module (in eval mode, on the CPU) and its metadata."""

    module: nn.Module
    metadata: ModelMetadata

    @property
    def table(self) -> TableSchema:
        """The table the model reads; a TaskError for a task that declared none."""
        if self.metadata.table is None:
            raise TaskError(
                f"task '{self.metadata.task_name}' declares no table (Task.table), so its "
                "model scores tensors only: use load_model(PATH).score(inputs)"
            )
        return self.metadata.table

    @property
    def score_columns(self) -> list[str]:
        """The names of `predict`'s score columns, in the order of `score`'s."""
        outputs = self.metadata.outputs
        if outputs == "binary":
            return ["score"]
        if outputs == "multiclass" and self.metadata.table is not None:
            return [f"p_{name}" for name in self.metadata.table.classes]
        if outputs == "regression":
            return ["prediction"]
        return []  # multiclass without class names, or custom: output_0, output_1...

    def score(self, inputs: torch.Tensor | np.ndarray) -> np.ndarray:
        """Scores of a batch of model inputs: (rows,) for a binary label or a regression,
        (rows, outputs) otherwise (class probabilities; a custom task's raw outputs)."""
        tensor = torch.as_tensor(inputs)
        if tensor.is_floating_point():  # the model's float32, also for a float64 array
            tensor = tensor.float()
        outputs, _ = model_outputs(self.module, TensorDataset(tensor, torch.zeros(len(tensor))))
        values = outputs.double()
        kind = self.metadata.outputs
        if kind == "binary":
            return torch.sigmoid(values.reshape(len(values), -1)[:, 0]).numpy()
        if kind == "regression":
            return values.reshape(len(values), -1)[:, 0].numpy()
        if kind == "multiclass":
            return torch.softmax(values, dim=-1).numpy()
        return values.numpy()

    def predict(
        self,
        frame: pd.DataFrame,
        id_column: str | None = None,
        source: str | Path = "the table",
        label: str | None = None,
    ) -> pd.DataFrame:
        """One row of scores per row of `frame`, encoded as in training; `id_column` (if
        in `frame`) comes first. The label column (the model's, or `label`) is ignored."""
        import pandas as pd

        table = self.table
        ignored = [c for c in (label or table.label, id_column) if c and c in frame.columns]
        scores = self.score(table.encode(frame.drop(columns=ignored), source))
        scores = scores.reshape(len(scores), -1)
        columns = self.score_columns or [f"output_{i}" for i in range(scores.shape[1])]
        result = pd.DataFrame(scores, columns=columns, index=frame.index)
        if id_column and id_column in frame.columns:
            result.insert(0, id_column, frame[id_column])
        return result


def load_model(path: str | Path) -> TrainedModel:
    """The model file at `path` (a run directory, its `model/` or a model.json) as a ready
    module. Loading reads JSON and safetensors only: nothing is unpickled."""
    metadata, weights = read_model_file(Path(path))
    module = build_module(metadata)
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise ModelFileError(
            f"{path}: the weights do not fit the model its model.json describes ({first})"
        ) from None
    return TrainedModel(module.eval(), metadata)


def build_module(metadata: ModelMetadata) -> nn.Module:
    """An untrained module of the architecture `metadata` names, on the CPU."""
    from fedmodel.table_task import table_task
    from fedmodel.task_loading import FixedModel, task_from_reference

    config = metadata.config.replace(device="cpu")
    if metadata.task_reference == TABULAR_TASK:
        if metadata.table is None:
            raise ModelFileError("a built-in table model's model.json must hold its table")
        width, classes = len(metadata.table.feature_names), max(1, len(metadata.table.classes))
        task = table_task(config, width, classes, table=metadata.table)
    else:
        task = task_from_reference(metadata.task_reference, config)
    factory = FixedModel(task.model) if config.fix_model else task.model
    return factory().cpu()
