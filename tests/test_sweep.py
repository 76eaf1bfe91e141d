"""`fedmodel sweep`: chosen on validation rows only, measured over seeds, resumable."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fedmodel.cli.main import main
from fedmodel.errors import ConfigError
from fedmodel.run_directory import RunSummary
from simulations.sweep_plan import PlannedRun, SweepDefinition, stage_one
from simulations.sweep_results import choose, validation_scores
from simulations.sweep_runs import SweepDirectory

ROOT = Path(__file__).resolve().parents[1]
DEFINITION = SweepDefinition("medical", (1.0, 2.0), (0, 1), (("lr", ("0.1", "0.5")),), (), 0.2)


def _row(epsilon: str, lr: str, stage: str, validation: float, test: float) -> dict[str, str]:
    """A sweep.csv row; stage 1 is scored on validation rows, stage 2 on the test set."""
    scored = {"1": "validation", "2": "test"}[stage]
    row = {"stage": stage, "epsilon": epsilon, "seed": "0", "lr": lr, "better": "higher"}
    for arm in ("federated", "central_dp", "site_alone"):
        row[f"validation_{arm}"] = row[f"test_{arm}"] = ""
        row[f"{scored}_{arm}"] = str(validation if stage == "1" else test)
    if stage == "1":  # a poisoned test column, as if someone had scored it: never read
        row["test_federated"] = str(test)
    return row


def test_the_choice_reads_validation_scores_and_never_test_scores() -> None:
    rows = [
        _row("1", "0.1", "1", validation=0.70, test=0.99),
        _row("1", "0.5", "1", validation=0.80, test=0.01),
        _row("2", "0.1", "1", validation=0.75, test=0.01),
        _row("2", "0.5", "1", validation=0.65, test=0.99),
        _row("1", "0.1", "2", validation=0.0, test=0.99),  # stage 2: test scores only
    ]
    scores = validation_scores(rows, DEFINITION)
    assert len(scores) == 4 and all(
        set(score.scores) == {"federated", "central_dp", "site_alone"} for score in scores
    )
    chosen = choose(scores)
    assert chosen[1.0]["federated"] == (("lr", "0.5"),)
    assert chosen[2.0]["federated"] == (("lr", "0.1"),)
    poisoned = [row | {"test_federated": "0.5"} for row in rows]
    assert choose(validation_scores(poisoned, DEFINITION)) == chosen


def test_validation_seeds_choose_by_the_mean_over_seeds() -> None:
    """One seed's noise can outweigh the difference between configurations (lending-club's
    federated AUROC spans 0.57-0.67 over seeds at one configuration): the mean decides."""
    definition = replace(DEFINITION, epsilons=(1.0,), validation_seeds=2)
    runs = stage_one(definition)
    assert [(run.config[0][1], run.seed) for run in runs] == [
        ("0.1", 0), ("0.1", 1), ("0.5", 0), ("0.5", 1)
    ]  # fmt: skip
    assert len({run.key(definition) for run in runs}) == 4
    seed_0 = [_row("1", "0.1", "1", 0.72, 0.0), _row("1", "0.5", "1", 0.70, 0.0)]
    seed_1 = [
        _row("1", "0.1", "1", 0.60, 0.0) | {"seed": "1"},
        _row("1", "0.5", "1", 0.75, 0.0) | {"seed": "1"},
    ]
    assert choose(validation_scores(seed_0, definition))[1.0]["federated"] == (("lr", "0.1"),)
    scores = validation_scores(seed_0 + seed_1, definition)
    assert [round(score.scores["federated"] or 0, 3) for score in scores] == [0.66, 0.725]
    assert choose(scores)[1.0]["federated"] == (("lr", "0.5"),)
    diverged = seed_1[1] | {"validation_federated": ""}  # a seed that did not score lr 0.5
    scores = validation_scores([*seed_0, seed_1[0], diverged], definition)
    assert scores[1].scores["federated"] is None
    assert choose(scores)[1.0]["federated"] == (("lr", "0.1"),)
    assert "validation_seeds" not in DEFINITION.to_json()  # a sweep from before resumes
    assert definition.to_json()["validation_seeds"] == 2
    assert [run.key(DEFINITION) for run in stage_one(DEFINITION)] == [
        PlannedRun(1, epsilon, 0, config).key(DEFINITION)
        for epsilon in DEFINITION.epsilons
        for config in DEFINITION.configs()
    ]  # one validation seed: the runs (and keys) of a sweep from before


def test_a_baseline_tie_goes_to_the_federated_choice() -> None:
    """A baseline ignores --aggregator: both grid points score it the same, and stage 2
    then reruns one configuration, not two."""
    definition = SweepDefinition(
        "medical", (1.0,), (0,), (("aggregator", ("fedavg", "fedadam")),), (), 0.2
    )
    rows = [
        {"stage": "1", "epsilon": "1", "aggregator": name, "better": "higher",
         "validation_federated": federated, "validation_central_dp": "0.7",
         "validation_site_alone": "0.6"}
        for name, federated in (("fedavg", "0.71"), ("fedadam", "0.74"))
    ]  # fmt: skip
    chosen = choose(validation_scores(rows, definition))[1.0]
    assert set(chosen.values()) == {(("aggregator", "fedadam"),)}


def _summary(federated: dict[str, float]) -> RunSummary:
    """A finished stage-1 run's summary, as `fedmodel simulate` writes it."""
    return RunSummary(
        scenario="medical", dataset="flchain", rounds=1, planned_rounds=1, completed=True,
        num_clients=2, dp=True, delta=1e-5, target_epsilon=1.0, accountant="rdp",
        final=federated, initial=None, per_round=[], clients=[],
        config={"validation_fraction": 0.2},
        baselines={"central_dp": {"auroc": 0.8, "loss": 0.5},
                   "local_mean": {"auroc": 0.7, "loss": 0.6},
                   "constant": {"auroc": 0.5, "loss": 0.2}},
    )  # fmt: skip


def test_metric_loss_chooses_the_lowest_loss_where_auroc_would_choose_otherwise(
    tmp_path: Path,
) -> None:
    """The fedavgm trade-off (docs/simulation.md): better ranking, worse probabilities."""
    by_loss = SweepDefinition(
        "medical", (1.0,), (0,), (("aggregator", ("fedavg", "fedavgm")),), (), 0.2, "loss"
    )
    scored = {"fedavg": {"auroc": 0.84, "loss": 0.43}, "fedavgm": {"auroc": 0.85, "loss": 0.70}}
    chosen = {}
    for definition in (by_loss, replace(by_loss, metric="")):
        directory = SweepDirectory(tmp_path / definition.metric, definition)
        rows = [
            directory.row_of(run, run.key(definition), _summary(scored[run.config[0][1]]), 1.0)
            for run in (PlannedRun(1, 1.0, 0, config) for config in definition.configs())
        ]
        chosen[definition.metric] = choose(validation_scores(rows, definition))[1.0]
        if definition.metric == "loss":
            assert [(row["metric"], row["better"]) for row in rows] == [("loss", "lower")] * 2
            assert [row["validation_federated"] for row in rows] == ["0.43", "0.7"]
    assert chosen["loss"]["federated"] == (("aggregator", "fedavg"),)
    assert chosen[""]["federated"] == (("aggregator", "fedavgm"),)  # the headline, AUROC

    typo = SweepDirectory(tmp_path / "typo", replace(by_loss, metric="brier"))
    with pytest.raises(ConfigError, match="--metric brier: this scenario's runs score auroc, "):
        typo.row_of(PlannedRun(1, 1.0, 0, by_loss.configs()[0]), "k", _summary({}), 1.0)
    assert "metric" not in DEFINITION.to_json()  # a sweep from before --metric resumes
    assert by_loss.to_json()["metric"] == "loss"


def test_the_report_keeps_the_test_log_loss_beside_a_ranking_metric(tmp_path: Path) -> None:
    """lr 2 and lr 0.5 tie on lending-club's AUROC; only the log-loss tells them apart."""
    from simulations.sweep_report import write_sweep_report
    from simulations.sweep_results import SweepOutcome, arm_results, constant_loss

    definition = replace(DEFINITION, epsilons=(1.0,))
    directory = SweepDirectory(tmp_path, definition)
    config = definition.configs()[0]
    rows = [
        directory.row_of(PlannedRun(stage, 1.0, seed, config), f"k{stage}{seed}",
                         _summary({"auroc": 0.62, "loss": loss}), 1.0)
        for stage, seed, loss in ((1, 0, 0.9), (2, 0, 0.25), (2, 1, 0.27))
    ]  # fmt: skip
    assert [row["test_loss_federated"] for row in rows] == ["", "0.25", "0.27"]
    assert rows[1]["test_loss_central_dp"] == "0.5" and rows[1]["test_loss_site_alone"] == "0.6"
    assert [row["test_loss_constant"] for row in rows] == ["", "0.2", "0.2"]
    chosen = choose(validation_scores(rows, definition))
    results = {result.arm: result for result in arm_results(rows, definition, chosen)}
    assert results["federated"].mean_loss == pytest.approx(0.26)  # stage 2's, not stage 1's
    assert results["site_alone"].mean_loss == pytest.approx(0.6)
    outcome = SweepOutcome(list(results.values()), "auroc", constant_loss(rows))
    write_sweep_report(tmp_path, definition, outcome, "fedmodel sweep")
    with (tmp_path / "best.csv").open() as file:
        best = {row["arm"]: row for row in csv.DictReader(file)}
    assert best["federated"]["test_loss_mean"] == "0.2600"
    report = (tmp_path / "sweep.md").read_text()
    assert "| test log-loss (mean) |" in report and "| 0.2600 |" in report
    assert (
        "scores a test log-loss of 0.2000: a log-loss above that is worse than no model" in report
    )

    before = [{k: v for k, v in row.items() if not k.startswith("test_loss")} for row in rows]
    old = arm_results(before, definition, chosen)  # a sweep.csv from before the column
    assert [result.mean_loss for result in old] == [None, None, None]
    assert [result.mean for result in old] == [pytest.approx(0.62), 0.8, 0.7]
    assert constant_loss(before) is None
    write_sweep_report(tmp_path, definition, SweepOutcome(old, "auroc", None), "fedmodel sweep")
    assert "no model" not in (tmp_path / "sweep.md").read_text()


def test_the_plot_of_a_loss_keeps_its_axis_at_zero_or_above(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three seeds' t-interval of a site alone's loss reached -0.6 on lending-club."""
    from matplotlib.figure import Figure

    from simulations import sweep_report
    from simulations.sweep_results import ArmResult, SweepOutcome

    figures: list[Figure] = []
    monkeypatch.setattr(sweep_report, "save", lambda figure, path: figures.append(figure))
    config = (("lr", "0.1"),)
    results = [
        ArmResult(1.0, "federated", config, 0.31, (0.27, 0.27, 0.24)),
        ArmResult(1.0, "site_alone", config, 6.0, (1.76, 2.86, 4.69)),
    ]
    outcome = SweepOutcome(results, "loss", None)
    sweep_report.write_sweep_report(tmp_path, DEFINITION, outcome, "fedmodel sweep")
    low, high = figures[0].axes[0].get_ylim()
    assert low == 0.0 and high > 4.69
    assert results[1].mean is not None and results[1].half_width is not None
    assert results[1].mean - results[1].half_width < 0  # the interval itself does reach below


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("colour=red,blue", "--grid colour: not an option the sweep can vary"),
        ("epsilon=1,2", "--grid epsilon: not an option the sweep can vary"),
        ("lr=0.1,fast", "--grid lr=fast: Invalid value for '--lr'"),
        ("lr=0.1,-1", "--grid lr=-1: --lr must be a positive number"),
        ("aggregator=fedavg,fedmagic", "--grid aggregator=fedmagic: --aggregator must be one of"),
        ("lr", "--grid takes KEY=V1,V2"),
    ],
)
def test_a_bad_grid_is_one_line_naming_the_key(
    grid: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    arguments = ["fedmodel", "sweep", "medical", "--grid", grid, "--output", str(tmp_path / "s")]
    monkeypatch.setattr(sys, "argv", arguments)
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not (tmp_path / "s").exists()


def test_no_validation_seeds_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "s"
    arguments = ["fedmodel", "sweep", "medical", "--validation-seeds", "0", "--output", str(output)]
    monkeypatch.setattr(sys, "argv", arguments)
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --validation-seeds must be at least 1 (got 0)"
    assert not output.exists()


def fedmodel(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI of this checkout, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "fedmodel.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


SWEEP = (
    *("sweep", "medical", "--dataset", "synthetic-ehr", "--clients", "2", "--rounds", "1"),
    *("--baseline-sites", "1", "--epsilon", "1", "--seeds", "2", "--validation-seeds", "2"),
    *("--jobs", "2"),
    *("--grid", "aggregator=fedavg,fedadam", "--output", "sweep"),
)


@pytest.mark.slow  # six simulate runs, two at a time: ~1-2 min on two cores
def test_a_tiny_sweep_chooses_on_validation_measures_over_seeds_and_resumes(
    tmp_path: Path,
) -> None:
    ran = fedmodel(*SWEEP, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    directory = tmp_path / "sweep"
    with (directory / "sweep.csv").open() as file:
        rows = list(csv.DictReader(file))
    first = [row for row in rows if row["stage"] == "1"]
    second = [row for row in rows if row["stage"] == "2"]
    assert sorted((row["aggregator"], row["seed"]) for row in first) == [
        ("fedadam", "0"), ("fedadam", "1"), ("fedavg", "0"), ("fedavg", "1")
    ]  # fmt: skip
    assert all(row["validation_federated"] and not row["test_federated"] for row in first)
    validation = {
        name: sum(float(row["validation_federated"]) for row in first if row["aggregator"] == name)
        / 2
        for name in ("fedavg", "fedadam")
    }
    best = max(validation, key=lambda name: validation[name])
    # the baselines ignore the aggregator: their tie goes to the federated choice
    assert sorted((row["aggregator"], row["seed"]) for row in second) == [(best, "0"), (best, "1")]
    assert all(row["test_federated"] and not row["validation_federated"] for row in second)
    assert all(row["test_loss_federated"] and row["test_loss_constant"] for row in second)
    assert not any(row["test_loss_federated"] for row in first)
    constant = sum(float(row["test_loss_constant"]) for row in second) / 2
    assert 0 < constant <= 0.6932  # a base rate's log-loss on a stratified test set: <= ln 2
    printed = " ".join(ran.stdout.split())
    assert f"the training rows' base rate) scores test log-loss {constant:.4f}." in printed
    with (directory / "best.csv").open() as file:
        chosen = {row["arm"]: row for row in csv.DictReader(file)}
    assert set(chosen) == {"federated", "central_dp", "site_alone"}
    tests = [float(row["test_federated"]) for row in second]
    assert chosen["federated"]["aggregator"] == best
    assert float(chosen["federated"]["validation_auroc"]) == pytest.approx(validation[best], 1e-3)
    assert float(chosen["federated"]["test_auroc_mean"]) == pytest.approx(sum(tests) / 2, abs=1e-4)
    assert float(chosen["federated"]["ci95_low"]) < sum(tests) / 2
    assert (directory / "privacy_utility.png").read_bytes()[:4] == b"\x89PNG"
    report = (directory / "sweep.md").read_text()
    assert "Tuning is not counted in epsilon" in report and "--grid aggregator=fedavg" in report
    assert "at each epsilon, 2 seeds (the choice reads their mean)" in report

    again = fedmodel(*SWEEP, cwd=tmp_path)  # resume: everything is finished, nothing runs
    assert again.returncode == 0, again.stdout + again.stderr
    assert "run 1/" not in again.stdout
    with (directory / "sweep.csv").open() as file:
        assert list(csv.DictReader(file)) == rows
    assert len(list((directory / "runs").glob("*.log"))) == 6

    other = fedmodel(*SWEEP[:-4], "--grid", "lr=0.1,0.5", "--output", "sweep", cwd=tmp_path)
    assert other.returncode == 2
    assert "holds another sweep" in other.stderr and len(other.stderr.strip().splitlines()) == 1
