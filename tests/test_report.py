"""report.md follows the run's scoring: a regression run reads in R2, MSE and MAE."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fedmodel.run_directory import RunSummary, Scoring
from fedmodel.task import LOWER_IS_BETTER
from simulations.baselines import compare_to_baselines
from simulations.report import (
    baseline_rows,
    baseline_verdict,
    federation_sentences,
    privacy_rows,
    write_report,
)
from simulations.report_html import write_html_report

REGRESSION = Scoring(("r2", "mse", "mae"), "r2", LOWER_IS_BETTER)


def scores(r2: float, mse: float) -> dict[str, Any]:
    return {"r2": r2, "mse": mse, "mae": mse / 2, "loss": mse}


def regression_summary(scoring: Scoring) -> RunSummary:
    """Two rounds; the federated model (R2 0.8, MSE 0.2) beats a site alone (0.5, 0.5)
    and loses to central training without DP (0.9, 0.1)."""
    federated = scores(0.8, 0.2)
    baselines: dict[str, Any] = {
        "central": scores(0.9, 0.1) | {"rows": 900},
        "central_dp": scores(0.85, 0.15) | {"rows": 900, "epsilon": 0.99},
        "local_mean": scores(0.5, 0.5),
        "local_worst": scores(0.3, 0.7) | {"client": "2", "epsilon": 0.98},
        "local_sites": 3,
        "local_sites_total": 3,
        "constant": scores(-0.01, 1.0),
    }
    baselines["comparison"] = compare_to_baselines(federated, baselines, scoring.headline)
    return RunSummary(
        scenario="csv",
        dataset="stay.csv",
        rounds=2,
        planned_rounds=2,
        completed=True,
        num_clients=3,
        dp=True,
        delta=1e-5,
        target_epsilon=1.0,
        accountant="rdp",
        final=federated,
        initial=scores(0.0, 1.0),
        per_round=[
            {"round": 1, **scores(0.6, 0.4), "train_loss": 0.5, "max_epsilon": 0.7, "clients": 3},
            {"round": 2, **federated, "train_loss": 0.3, "max_epsilon": 0.99, "clients": 3},
        ],
        clients=[],
        config={},
        scoring=scoring,
        baselines=baselines,
    )


def test_a_regression_report_leads_with_r2_and_plots_it(tmp_path: Path) -> None:
    report = write_report(tmp_path, regression_summary(REGRESSION)).read_text()
    assert "**Final test R2 0.8000**, MSE 0.2000, MAE 0.1000, loss 0.2000." in report
    assert "| round | R2 | MSE | MAE | loss | train loss | max epsilon | clients |" in report
    assert "| 2 | 0.8000 | 0.2000 | 0.1000 | 0.2000 | 0.3000 | 0.990 | 3 |" in report
    assert "| model | R2 | MSE | MAE | loss | epsilon |" in report
    assert "| constant prediction (no model) | -0.0100 | 1.0000 | 0.5000 | 1.0000 | - |" in report
    assert "AUROC" not in report and "accuracy" not in report
    assert "![r2.png](r2.png)" in report
    assert (tmp_path / "r2.png").read_bytes().startswith(b"\x89PNG")
    assert "The federated model scored 0.3000 R2 better than a site training alone" in report


def test_a_lower_is_better_headline_reads_as_better_when_it_fell() -> None:
    """The federation's MSE is 0.3 below a site's alone: 0.3 better; privacy raised
    central MSE by 0.05: 0.05 worse."""
    summary = regression_summary(Scoring(("mse", "r2", "mae"), "mse", LOWER_IS_BETTER))
    assert summary.baselines is not None
    assert summary.baselines["comparison"]["federated_minus_local_mean"] == pytest.approx(-0.3)
    verdict = baseline_verdict(summary)
    assert verdict.startswith("Lower MSE is better.")
    assert "scored 0.3000 MSE better than a site training alone (mean site)" in verdict
    assert "and 0.5000 MSE better than the worst site" in verdict
    assert "Central training under DP scored 0.0500 MSE worse than without DP" in verdict
    assert "the federated model 0.0500 MSE worse than central DP" in verdict


def test_the_verdict_weighs_the_federated_loss_against_no_model() -> None:
    """Lower than the constant's loss: by how much; higher: worse than no model; a
    summary from before the constant row: no sentence and no row."""
    summary = regression_summary(REGRESSION)
    assert summary.baselines is not None
    assert baseline_verdict(summary).endswith(
        "The federated model's loss, 0.2000, is 0.8000 lower than the constant prediction's "
        "(1.0000)."
    )
    beaten = replace(summary, baselines={**summary.baselines, "constant": scores(0.0, 0.15)})
    assert baseline_verdict(beaten).endswith(
        "is 0.0500 higher than the constant prediction's (0.1500): judged by its loss, it is "
        "worse than no model."
    )
    before = {key: value for key, value in summary.baselines.items() if key != "constant"}
    old = replace(summary, baselines=before)
    assert "constant" not in baseline_verdict(old)
    assert all(not row[0].startswith("constant") for row in baseline_rows(old))


def test_tables_name_clients_by_their_sites_where_the_data_names_them() -> None:
    summary = regression_summary(REGRESSION)
    client = {"client": "2", "num_examples": 40, "epsilon": 0.98, "delta": 1e-5}
    named = replace(
        summary, clients=[client], federation={"site_names": ["north", "south", "east"]}
    )
    ((name, *_),) = privacy_rows(named)
    assert name == "east"  # partition 2 is the third site the data names
    assert any("worst: east" in row[0] for row in baseline_rows(named))
    ((number, *_),) = privacy_rows(replace(summary, clients=[client]))
    assert number == "2"  # no names in the data: the number


def test_a_federation_that_lost_to_a_site_alone_says_worse_not_a_negative_gain() -> None:
    summary = regression_summary(REGRESSION)
    assert summary.baselines is not None
    comparison = compare_to_baselines(scores(0.4, 0.6), summary.baselines, "r2")
    lost = replace(summary, baselines={**summary.baselines, "comparison": comparison})
    verdict = baseline_verdict(lost)
    assert "scored 0.1000 R2 worse than a site training alone (mean site)" in verdict
    assert "-0." not in verdict and "+" not in verdict


def test_report_html_escapes_site_names_and_embeds_the_plots_report_md_shows(
    tmp_path: Path,
) -> None:
    """report.html names sites as text, never markup, and carries its plots inside."""
    client = {"client": "2", "num_examples": 40, "epsilon": 0.98, "delta": 1e-5}
    client["epsilon_by_round"] = [[1, 0.7], [2, 0.98]]
    hostile = '<img src="https://x.example/p.png"> & co'
    summary = replace(
        regression_summary(REGRESSION),
        clients=[client],
        federation={"site_names": ["north", "south", hostile]},
    )
    write_report(tmp_path, summary)
    page = write_html_report(tmp_path, summary).read_text()
    assert page.count("&lt;img src=&quot;https://x.example/p.png&quot;&gt; &amp; co") == 2
    assert '<img src="https' not in page  # the site's "image" is text in both tables
    plots = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)">', page)
    assert [name for _, name in plots] == ["r2.png", "epsilon.png"]
    for data, name in plots:
        assert base64.b64decode(data) == (tmp_path / name).read_bytes()
    assert "<th>R2</th><th>MSE</th><th>MAE</th>" in page


def test_the_natural_sites_sentence_reads_right_whether_or_not_a_site_sat_out() -> None:
    summary = regression_summary(REGRESSION)
    notes = {"natural_sites": 3, "min_dp_rows": 20}
    none_out = replace(summary, federation={**notes, "too_small_to_train": []})
    assert federation_sentences(none_out) == [
        "Clients are the data's 3 natural sites; each has at least 20 training rows and trains."
    ]
    one_out = replace(summary, federation={**notes, "too_small_to_train": ["7"]})
    assert (
        "; 1 of them has fewer than 20 training rows, too few" in federation_sentences(one_out)[0]
    )


def test_a_run_scored_on_validation_rows_never_calls_its_scores_test_scores(
    tmp_path: Path,
) -> None:
    """A sweep's stage-1 run (`--validation-fraction`) is scored on held-out training rows:
    its reports say so, in the headline and the baselines' note alike."""
    summary = replace(regression_summary(REGRESSION), config={"validation_fraction": 0.2})
    (tmp_path / "md").mkdir()
    markdown = write_report(tmp_path / "md", summary).read_text()
    html = write_html_report(tmp_path / "md", summary).read_text()
    for report in (markdown, html):
        assert "Final validation R2" in report and "scored on the same validation rows" in report
        assert "Final test" not in report and "test set" not in report
    plain = write_report(tmp_path, regression_summary(REGRESSION)).read_text()
    assert "scored on the same test set" in plain
