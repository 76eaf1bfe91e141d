"""End to end through Flower's engine: a natural-site scenario and a user's own CSV."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulations.report import PRIVACY_COLUMNS
from tests.browser import save_screenshot
from tests.conftest import assert_epsilons_recompute
from tests.test_csv import clinic_table
from tests.test_simulation import engine_processes

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def simulate(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str, str]:
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [str(BIN / "fedmodel"), "simulate", *args, "--output", str(run_dir)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert engine_processes(run_dir) == []
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, (run_dir / "report.md").read_text(), result.stdout


def test_covid_clinics_federate_the_clinics_big_enough_for_dp(tmp_path: Path) -> None:
    summary, report, stdout = simulate(
        tmp_path,
        "medical",
        "--dataset",
        "covid-clinics",
        "--rounds",
        "1",
        "--fraction",
        "0.1",
        "--baseline-sites",
        "2",
    )
    assert summary["dataset"] == "covid-clinics" and summary["completed"] is True
    assert summary["num_clients"] == 39
    assert summary["federation"]["natural_sites"] == 88
    assert len(summary["federation"]["too_small_to_train"]) == 49
    assert summary["per_round"][0]["clients"] == 3  # int(39 x 0.1) sampled by FedAvg
    final = summary["final"]
    assert 0.0 <= final["auprc"] <= 1.0 and 0.0 <= final["recall_at_1pct_fpr"] <= 1.0
    baselines = summary["baselines"]
    assert baselines["central"]["auroc"] > 0.6  # weak but real signal (AUC ~0.65-0.7)
    assert baselines["local_sites"] == 2
    assert "88 natural sites" in stdout and "## Baselines" in report
    assert all(client["epsilon"] <= 1.0 for client in summary["clients"])
    assert_epsilons_recompute(summary)


# Site names come from the user's data: one that is markup-like stays text in every report.
MARKUP_SITE = "St. Mary's & <East>"


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """A user's CSV of three clinics, one client per site, trained for 2 rounds: (summary,
    report.md, run directory), shared by the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("csv-run")
    data = tmp_path / "clinics.csv"
    table = clinic_table(rows=3000)
    table["site"] = table["site"].replace({"east": MARKUP_SITE})
    table.to_csv(data, index=False)
    summary, report, _ = simulate(
        tmp_path,
        "csv",
        "--data",
        str(data),
        "--label",
        "outcome",
        "--partition-by",
        "site",
        "--rounds",
        "2",
        "--local-epochs",
        "2",
        "--epsilon",
        "3",
        "--baseline-sites",
        "3",
    )
    return summary, report, tmp_path / "run"


def test_a_users_csv_runs_one_client_per_site(csv_run: tuple[dict[str, Any], str, Path]) -> None:
    summary, report, run_dir = csv_run
    assert (summary["scenario"], summary["dataset"]) == ("csv", "clinics.csv")
    assert summary["num_clients"] == 3
    assert summary["federation"]["site_names"] == [MARKUP_SITE, "north", "south"]
    assert sum(client["num_examples"] for client in summary["clients"]) == 2400
    assert summary["final"]["auroc"] > 0.65  # each site alone under DP reaches ~0.68-0.71
    assert summary["baselines"]["local_sites"] == 3
    assert_epsilons_recompute(summary)
    assert "site alone (DP)" in report
    assert len(summary["heterogeneity"]["clients"]) == 3 and "## Heterogeneity" in report
    assert (run_dir / "heterogeneity.png").read_bytes().startswith(b"\x89PNG")


def test_report_html_opens_offline_in_chromium_with_its_tables_sites_and_plots(
    csv_run: tuple[dict[str, Any], str, Path], browser: Any
) -> None:
    """report.html from a real run, as a mail client hands it to a browser: a file:// page
    that requests nothing, shows every table and site by name (markup in a name stays
    text) and decodes every embedded plot."""
    summary, _, run_dir = csv_run
    page = run_dir / "report.html"
    assert not re.search(r"https?:", page.read_text())
    browser.get(page.as_uri())
    assert browser.title == "FedModel run: csv / clinics.csv"
    headers = [cell.text for cell in browser.find_elements("tag name", "th")]
    for column in (*PRIVACY_COLUMNS, "model", "round", "AUROC", "train loss"):
        assert column in headers
    text = browser.find_element("tag name", "body").text
    for site in summary["federation"]["site_names"]:
        assert site in text
    worst = summary["baselines"]["local_worst"]["client"]
    assert f"worst: {summary['federation']['site_names'][int(worst)]}" in text
    assert browser.find_elements("tag name", "east") == []  # the name's "<East>" is no element
    images = browser.find_elements("tag name", "img")
    names = [image.get_attribute("alt") for image in images]
    assert names == ["auroc.png", "epsilon.png", "heterogeneity.png"]
    for image in images:
        assert browser.execute_script("return arguments[0].naturalWidth", image) > 0
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    save_screenshot(browser, "report-html")
