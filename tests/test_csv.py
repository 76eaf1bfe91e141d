"""`fedmodel simulate csv`: a user's own table, and one clear line (exit 2) per bad input."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedmodel.cli.main import main
from fedmodel.config import RunConfig
from fedmodel.data import make_loader
from fedmodel.datasets.csv_scenario import load_csv_split
from fedmodel.datasets.scenarios import federation
from fedmodel.errors import ConfigError
from fedmodel.evaluation import evaluate
from fedmodel.models import ClassifierLoss, build_model
from fedmodel.training import select_device, train_dp
from tests.conftest import resolved_config

LOSS = ClassifierLoss(reduction="none")


def clinic_table(rows: int = 600, seed: int = 0) -> pd.DataFrame:
    """A small made-up multi-site table: numbers, a category, gaps, a site column."""
    rng = np.random.default_rng(seed)
    age = rng.normal(60, 10, rows)
    ward = rng.choice(["icu", "general", "day"], rows)
    lactate = rng.gamma(2.0, 1.0, rows)
    lactate[rng.random(rows) < 0.1] = np.nan
    risk = 0.05 * (age - 60) + 0.8 * (ward == "icu") + 0.5 * np.nan_to_num(lactate - 2)
    outcome = np.where(rng.random(rows) < 1 / (1 + np.exp(-(risk - 1.0))), "yes", "no")
    site = rng.choice(["north", "south", "east"], rows, p=[0.5, 0.3, 0.2])
    return pd.DataFrame(
        {"age": age, "ward": ward, "lactate": lactate, "site": site, "outcome": outcome}
    )


def test_a_users_csv_becomes_one_client_per_site(tmp_path: Path) -> None:
    path = tmp_path / "clinics.csv"
    clinic_table().to_csv(path, index=False)
    config = RunConfig(
        scenario="csv", dataset=path.name, data=str(path), label="outcome", partition_by="site"
    )
    config = resolved_config(config, clients_given=False)
    clients = federation(config)
    assert config.clients == 3 and clients.site_names == ("east", "north", "south")
    assert sum(len(c) for c in clients.clients) + len(clients.test) == 600
    assert clients.clients[0].feature_names == (
        "age",
        "lactate",
        "ward=day",
        "ward=general",
        "ward=icu",
    )
    assert np.isfinite(clients.clients[0].features).all()  # gaps imputed


def test_parquet_and_iid_clients(tmp_path: Path) -> None:
    path = tmp_path / "clinics.parquet"
    clinic_table().drop(columns=["site"]).to_parquet(path)
    config = RunConfig(scenario="csv", dataset=path.name, data=str(path), label="outcome")
    assert [len(c) for c in federation(config.replace(clients=4)).clients] == [120] * 4
    assert len(load_csv_split(str(path), "outcome", None).test) == 120


def test_multiclass_label_trains_one_logit_per_class(tmp_path: Path) -> None:
    table = clinic_table(rows=1500)
    table["ward"] = np.where(
        table["age"] > 66, "icu", np.where(table["age"] < 54, "day", "general")
    )
    path = tmp_path / "wards.csv"
    table.to_csv(path, index=False)
    config = RunConfig(
        scenario="csv", dataset=path.name, data=str(path), label="ward", task="multiclass"
    )
    clients = federation(config.replace(clients=3))
    assert clients.test.num_classes == 3 and clients.clients[0].num_classes == 3
    assert set(np.unique(clients.test.labels)) == {0.0, 1.0, 2.0}  # day, general, icu
    torch.manual_seed(0)
    model = build_model("logreg", clients.test.num_features, clients.test.num_classes)
    loader = make_loader(clients.clients[0].dataset(), 32, seed=0)
    result = train_dp(model, LOSS, loader, 3, 0.5, 0.8, 1.0, [], select_device("cpu"))
    assert result.history  # DP-SGD ran with cross-entropy over three logits
    metrics = evaluate(model, clients.test.dataset(), LOSS, "multiclass")
    assert metrics["accuracy"] > 0.6 and metrics["auroc"] > 0.8  # chance: ~0.33 and 0.5


def test_binary_task_points_a_many_valued_label_to_multiclass(tmp_path: Path) -> None:
    path = tmp_path / "wards.csv"
    clinic_table().to_csv(path, index=False)
    with pytest.raises(ConfigError, match="use --task multiclass"):
        load_csv_split(str(path), "ward", None)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    good = clinic_table()
    files = {
        "good": good,
        "one-class": good.assign(outcome="no"),
        "garbage": good.assign(age=good["age"].round(1).astype(object)),
        "sparse-site": good.assign(site=[f"s{i}" if i < 3 else "big" for i in range(600)]),
        "site-gaps": good.assign(site=good["site"].where(good.index % 50 != 0)),
    }
    files["garbage"].loc[17, "age"] = "sixty"
    for name, frame in files.items():
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    (tmp_path / "empty.csv").write_text("")
    data = str(tmp_path)
    return {
        "missing label": (
            ["--data", f"{data}/good.csv", "--label", "died"],
            "label column 'died' is not in",
        ),
        "one class": (["--data", f"{data}/one-class.csv", "--label", "outcome"], "only one class"),
        "garbage": (
            ["--data", f"{data}/garbage.csv", "--label", "outcome"],
            "column 'age' in .* is numeric but data row 18 holds 'sixty'",
        ),
        "empty file": (["--data", f"{data}/empty.csv", "--label", "outcome"], "cannot read"),
        "empty clients": (
            [
                "--data",
                f"{data}/sparse-site.csv",
                "--label",
                "outcome",
                "--partition-by",
                "site",
            ],
            "--partition-by site makes .* client\\(s\\) with no training rows",
        ),
        "partition gaps": (
            ["--data", f"{data}/site-gaps.csv", "--label", "outcome", "--partition-by", "site"],
            "--partition-by column 'site' is empty in 12 row",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["missing label", "one class", "garbage", "empty file", "empty clients", "partition gaps"],
)
def test_bad_input_is_one_line_and_exit_code_2(
    case: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    arguments, message = _bad_inputs(tmp_path)[case]
    output = tmp_path / "run"
    monkeypatch.setattr(
        sys, "argv", ["fedmodel", "simulate", "csv", *arguments, "--output", str(output)]
    )
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert re.search(message, stderr), stderr
    assert not output.exists()  # nothing written for a rejected input
    # The simulation workers had started importing before the data was read: all stopped.
    assert _processes_started_for(output) == []


def _processes_started_for(run_dir: Path) -> list[int]:
    """Processes whose environment names `run_dir` (the engine's private FLWR_HOME)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(run_dir).encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
