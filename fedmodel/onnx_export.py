"""`fedmodel export --format onnx`: a trained table model as one ONNX graph, preprocessing included.

The graph takes raw numbers and gives the scores `fedmodel predict` gives (within float32
rounding): the standardisation (missing value: NaN, replaced by the training mean) is in
the graph, and so is the last step (sigmoid, softmax). Inputs:

- `numeric` (rows, numeric columns): the numeric columns, in the order of the graph's
  metadata `numeric_columns`, as they are in the table;
- `categories` (rows, one-hot columns), only when the table has text columns: for each
  text column in the order of `categorical_columns`, one 0/1 column per value of its
  vocabulary (metadata `categories`: the encoded names `column=value`), 1 where the cell
  equals that value; an unseen or missing value is all zeros.

Needs the `onnx` extra (the `onnx` package); nothing else of FedModel reads it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from fedmodel.errors import ConfigError
from fedmodel.trained_model import TrainedModel

OPSET = 17


class ScoringGraph(nn.Module):
    """A trained module behind the table's standardisation and before its last step."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, trained: TrainedModel) -> None:
        super().__init__()
        table = trained.table
        statistics = table.statistics
        names = table.numeric_columns
        moments = [statistics.mean_and_std(n) if statistics else (0.0, 1.0) for n in names]
        self.register_buffer("mean", torch.tensor([m for m, _ in moments], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([s for _, s in moments], dtype=torch.float32))
        self.module = trained.module
        self.outputs = trained.metadata.outputs
        self.standardise = statistics is not None

    def forward(
        self, numeric: torch.Tensor, categories: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs = numeric
        if self.standardise:
            inputs = (torch.where(torch.isnan(numeric), self.mean, numeric) - self.mean) / self.std
        if categories is not None:
            inputs = torch.cat([inputs, categories], dim=1)
        outputs = self.module(inputs)
        if self.outputs == "binary":
            return torch.sigmoid(outputs.reshape(outputs.shape[0], -1)[:, 0])
        if self.outputs == "regression":
            return outputs.reshape(outputs.shape[0], -1)[:, 0]
        if self.outputs == "multiclass":
            return torch.softmax(outputs, dim=-1)
        return outputs


def export_onnx(trained: TrainedModel, target: Path) -> Path:
    """Write `trained` (a model that reads a table) as an ONNX graph to `target`."""
    try:
        import onnx
    except ImportError:
        raise ConfigError(
            "ONNX export needs the onnx package: pip install 'fedmodel[onnx]'"
        ) from None
    table = trained.table
    graph = ScoringGraph(trained).eval()
    numeric = torch.zeros(2, len(table.numeric_columns))
    one_hot = len(table.feature_names) - len(table.numeric_columns)
    example: tuple[torch.Tensor, ...] = (numeric,)
    names = ["numeric"]
    if one_hot:
        example, names = (numeric, torch.zeros(2, one_hot)), ["numeric", "categories"]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, not wrong
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example,
            str(partial),
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            output_names=["score"],
            dynamic_axes={name: {0: "rows"} for name in [*names, "score"]},
        )
    exported = onnx.load(str(partial))
    described = {
        "numeric_columns": list(table.numeric_columns),
        "categorical_columns": list(table.input_columns[len(table.numeric_columns) :]),
        "categories": list(table.feature_names[len(table.numeric_columns) :]),
        "classes": list(table.classes),
        "outputs": trained.metadata.outputs,
        "fedmodel_model": json.dumps(trained.metadata.to_json()["task"]),
    }
    onnx.helper.set_model_props(
        exported,
        {key: v if isinstance(v, str) else json.dumps(v) for key, v in described.items()},
    )
    onnx.save(exported, str(partial))
    partial.replace(target)
    return target
