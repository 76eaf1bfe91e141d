"""`fedmodel predict` and `fedmodel export`: use a run's trained model (fedmodel.model_file)."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fedmodel.errors import ConfigError

MODEL_PATH_HELP = "A run directory (its final model), a model directory or its model.json."


def predict_command(
    path: Annotated[Path, typer.Argument(help=MODEL_PATH_HELP, show_default=False)],
    data: Annotated[
        Path,
        typer.Option(
            help="CSV or Parquet file to score: the columns the model was trained on; the "
            "label column and the identifier column may be there too.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(help="Write the scores here (.csv or .parquet); default: CSV on stdout."),
    ] = None,
    id_column: Annotated[
        str, typer.Option(help="Identifier column copied beside each row's scores, if present.")
    ] = "id",
    label: Annotated[
        str | None,
        typer.Option(
            help="Label column to ignore (default: the model's; a deployed model's nodes "
            "never told the coordinator theirs).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Score a table with a trained model: one score per row (the probability of class 1),
    one probability per class, or the prediction of a regression.

    The file is read and encoded as in training (the model file's means, deviations and
    categories); a missing, unexpected or mistyped column is a one-line error.
    """
    from fedmodel.local_tables import read_frame
    from fedmodel.trained_model import load_model

    trained = load_model(path)
    scores = trained.predict(read_frame(data), id_column=id_column, source=data, label=label)
    if output is None:
        scores.to_csv(sys.stdout, index=False)
        return
    suffix = output.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ConfigError(f"--output {output} must end in .csv or .parquet")
    partial = output.with_name(output.name + ".partial")
    if suffix == ".csv":
        scores.to_csv(partial, index=False)
    else:
        scores.to_parquet(partial, index=False)
    os.replace(partial, output)
    typer.echo(f"{len(scores)} rows scored -> {output}", err=True)


class ExportFormat(StrEnum):
    """What `fedmodel export` can write."""

    ONNX = "onnx"


def export_command(
    path: Annotated[Path, typer.Argument(help=MODEL_PATH_HELP, show_default=False)],
    format: Annotated[  # noqa: A002 - the option is --format
        ExportFormat, typer.Option(help="onnx: one graph, standardisation included.")
    ] = ExportFormat.ONNX,
    output: Annotated[
        Path | None,
        typer.Option(help="Where to write it; default: model.onnx beside model.json."),
    ] = None,
) -> None:
    """Export a trained table model for other runtimes (the onnx extra).

    The graph takes the raw numeric columns (NaN for a missing value) and, if the table
    has text columns, their one-hot encoding; docs/model.md says exactly how.
    """
    from fedmodel.model_file import model_directory
    from fedmodel.onnx_export import export_onnx
    from fedmodel.trained_model import load_model

    trained = load_model(path)
    target = output or model_directory(path) / "model.onnx"
    typer.echo(f"wrote {export_onnx(trained, target)}")
