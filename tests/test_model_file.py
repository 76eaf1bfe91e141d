"""A model file scores new tables as training encoded them, exports to ONNX with its
preprocessing, turns bad inputs into one line, and is read without unpickling anything.

The model here is the built-in table model with untrained weights, saved as a run saves
it; tests/test_simulation.py and tests/test_examples.py check trained models of real runs.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from fedmodel.cli.main import main
from fedmodel.config import TABULAR_TASK, RunConfig
from fedmodel.datasets.csv_scenario import load_csv_split
from fedmodel.errors import ExitCode
from fedmodel.local_tables import describe_table
from fedmodel.model_file import ModelMetadata, save_model_file
from fedmodel.table_schema import TableSchema
from fedmodel.table_task import table_task
from fedmodel.trained_model import load_model

TRAINING = pd.DataFrame(
    {
        "age": [50.0, 61.0, np.nan, 70.0, 45.0, 80.0],
        "creatinine": [1.0, 1.3, 0.9, np.nan, 1.1, 2.0],
        "sex": ["F", "M", "M", "F", None, "M"],
        "death": [0, 1, 0, 1, 0, 1],
    }
)
NEW_PATIENTS = pd.DataFrame(
    {
        "id": ["p1", "p2", "p3", "p4"],
        "age": [55.0, np.nan, 90.0, 30.0],
        "creatinine": [1.2, 0.8, np.nan, 3.0],
        "sex": ["M", "F", None, "X"],  # missing and unseen: all zeros
    }
)


def save_table_model(
    path: Path, config: RunConfig, schema: TableSchema, classes: int, privacy: dict[str, Any]
) -> Path:
    """A freshly initialised built-in table model saved as a model file, as a run saves it."""
    task = table_task(config, len(schema.feature_names), classes, table=schema)
    metadata = ModelMetadata(
        task_name=task.name,
        task_version=task.version,
        task_reference=TABULAR_TASK,
        outputs=config.task,
        run_config=dict(config.to_run_config()),
        table=schema,
        privacy=privacy,
        run_id="test",
        round=1,
    )
    return save_model_file(path, task.model().state_dict(), metadata)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    schema = TableSchema("death", statistics=describe_table(TRAINING.drop(columns=["death"])))
    torch.manual_seed(0)
    privacy = {"epsilon_per_owner": {"hospital-a": 0.5}}
    return save_table_model(tmp_path / "model", RunConfig(), schema, 2, privacy)


def fedmodel(
    *args: str | Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the `fedmodel` command line, run in this process."""
    monkeypatch.setattr(sys, "argv", ["fedmodel", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def by_hand(frame: pd.DataFrame) -> np.ndarray:
    """The training encoding, written out: numbers standardised with the training rows'
    mean and deviation (missing: the mean), then one 0/1 column per training sex."""
    columns = []
    for name in ("age", "creatinine"):
        mean, std = TRAINING[name].mean(), TRAINING[name].std()
        columns.append(((frame[name] - mean) / std).fillna(0.0).to_numpy())
    columns += [(frame["sex"] == value).to_numpy(dtype=float) for value in ("F", "M")]
    return np.stack(columns, axis=1)


def test_predict_encodes_new_rows_with_the_training_statistics(model_dir: Path) -> None:
    trained = load_model(model_dir)
    assert not trained.module.training
    scores = trained.predict(NEW_PATIENTS, id_column="id")
    assert list(scores.columns) == ["id", "score"] and list(scores["id"]) == [
        "p1",
        "p2",
        "p3",
        "p4",
    ]
    logits = trained.module(torch.tensor(by_hand(NEW_PATIENTS), dtype=torch.float32))
    expected = torch.sigmoid(logits.double())[:, 0].detach().numpy()
    np.testing.assert_allclose(scores["score"], expected, rtol=1e-6)


def test_a_multiclass_model_gives_one_probability_per_class_in_the_label_order(
    tmp_path: Path,
) -> None:
    rows = TRAINING.drop(columns=["death"]).assign(kind=["eel", "cat", "dog", "cat", "eel", "dog"])
    path = tmp_path / "animals.csv"
    rows.to_csv(path, index=False)
    split = load_csv_split(str(path), "kind", None, "multiclass")
    assert split.schema.classes == ("cat", "dog", "eel")  # the label's values, sorted
    save_table_model(tmp_path / "model", RunConfig(task="multiclass"), split.schema, 3, {})
    scores = load_model(tmp_path / "model").predict(rows, source=path)
    assert list(scores.columns) == ["p_cat", "p_dog", "p_eel"]
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-12)


def test_onnx_export_scores_raw_numbers_like_load_model_within_1e_5(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime

    code, out, err = fedmodel("export", model_dir, "--format", "onnx", monkeypatch=monkeypatch,
                              capsys=capsys)  # fmt: skip
    assert code == 0, err
    session = onnxruntime.InferenceSession(str(model_dir / "model.onnx"))
    props = session.get_modelmeta().custom_metadata_map
    numeric_columns = json.loads(props["numeric_columns"])
    categories = json.loads(props["categories"])
    assert (numeric_columns, categories) == (["age", "creatinine"], ["sex=F", "sex=M"])
    # what a consumer feeds: the raw numbers (NaN when missing) and the one-hot categories
    numeric = NEW_PATIENTS[numeric_columns].to_numpy(dtype=np.float32)
    one_hot = np.stack(
        [(NEW_PATIENTS["sex"] == name.split("=", 1)[1]).to_numpy() for name in categories], 1
    ).astype(np.float32)
    (exported,) = session.run(["score"], {"numeric": numeric, "categories": one_hot})
    expected = load_model(model_dir).predict(NEW_PATIENTS.drop(columns=["id"]))["score"]
    np.testing.assert_allclose(exported, expected, atol=1e-5)
    assert np.isfinite(exported).all()


def _missing_column(directory: Path, model_dir: Path) -> Path:
    path = directory / "patients.csv"
    NEW_PATIENTS.drop(columns=["creatinine"]).to_csv(path, index=False)
    return path


def _text_in_a_number(directory: Path, model_dir: Path) -> Path:
    path = directory / "patients.csv"
    NEW_PATIENTS.assign(age=["55", "sixty", "90", "30"]).to_csv(path, index=False)
    return path


def _unknown_column(directory: Path, model_dir: Path) -> Path:
    path = directory / "patients.parquet"
    NEW_PATIENTS.assign(weight=70.0).to_parquet(path)
    return path


def _newer_format(directory: Path, model_dir: Path) -> Path:
    metadata = json.loads((model_dir / "model.json").read_text())
    (model_dir / "model.json").write_text(json.dumps({**metadata, "format_version": 2}))
    path = directory / "patients.csv"
    NEW_PATIENTS.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("make", "message", "exit_code"),
    [
        (_missing_column, "lacks column(s) the model reads: creatinine", ExitCode.DATA),
        (_text_in_a_number, "column 'age' in ", ExitCode.DATA),
        (_unknown_column, "has column(s) the model was not trained on: weight", ExitCode.DATA),
        (_newer_format, "is model format 2, from a newer FedModel", ExitCode.MODEL_FILE),
    ],
)
def test_bad_inputs_end_in_one_line_and_a_nonzero_exit(
    make: object,
    message: str,
    exit_code: ExitCode,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = make(tmp_path, model_dir)  # type: ignore[operator]
    code, out, err = fedmodel("predict", model_dir, "--data", data, monkeypatch=monkeypatch,
                              capsys=capsys)  # fmt: skip
    assert code == exit_code and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert message in err
    if make is _text_in_a_number:
        assert "must be numeric, but data row 2 holds 'sixty'" in err


class CodeOnUnpickling:
    """A pickle that creates `marker` when it is unpickled: any code could run there."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_runs(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(CodeOnUnpickling(proof)))
    assert proof.exists()  # the payload is live: unpickling it runs code

    marker = tmp_path / "attacker-was-here"
    torch.save({"0.weight": CodeOnUnpickling(marker)}, model_dir / "model.safetensors")
    data = tmp_path / "patients.csv"
    NEW_PATIENTS.to_csv(data, index=False)
    code, _, err = fedmodel("predict", model_dir, "--data", data, monkeypatch=monkeypatch,
                            capsys=capsys)  # fmt: skip
    assert code == ExitCode.MODEL_FILE and "is not a safetensors file" in err
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists()
