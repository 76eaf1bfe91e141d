"""End to end: a real `--dp client` simulation with adaptive clipping, audited and tampered with."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fedmodel.privacy.audit import audit
from fedmodel.privacy.central import FEDERATION_LEDGER
from fedmodel.privacy.ledger import PrivacyLedger
from tests.conftest import dp_accounting_epsilon
from tests.console import fetch, table_rows
from tests.test_simulation import simulate

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DELTA = 1e-5


def audit_cli(run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "fedmodel"), "audit", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_client_level_dp_run_is_accounted_stops_at_its_budget_and_audits(tmp_path: Path) -> None:
    # Every client every round (q = 1), effective noise 1.0: epsilon 7.08 after two
    # releases and 9.01 after three, so a budget of 8 allows two of the three rounds.
    _, run_dir = simulate(
        tmp_path,
        "--clients", "3", "--rounds", "3", "--dp", "client", "--central-adaptive",
        "--central-noise", "1.0", "--central-count-stddev", "1.0",
        "--central-clipping-norm", "0.5", "--central-epsilon", "8",
        "--no-baselines", "--engine", "local",
    )  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is True and summary["rounds"] == 2
    assert summary["stopped_early"].startswith("client-level DP budget: round 3 would take")
    assert summary["dp"] is False and summary["dp_mode"] == "client"  # no DP-SGD on clients
    checkpoints = run_dir / "checkpoints"
    assert list(checkpoints.glob("*0002*")) and not list(checkpoints.glob("*0003*"))

    central = summary["client_level_dp"]
    releases = central["releases"]
    assert [r["round"] for r in releases] == [1, 2]
    for release in releases:  # Andrew et al., Thm 1, from the noise levels actually used
        update, count = release["noise_multiplier"], release["clipped_count_stddev"]
        assert (update**-2 + (2 * count) ** -2) ** -0.5 == pytest.approx(1.0)
        assert release["effective_noise_multiplier"] == pytest.approx(1.0)
    assert releases[0]["clipping_norm"] == 0.5 and releases[1]["clipping_norm"] != 0.5
    history = [(r["effective_noise_multiplier"], r["sample_rate"], 1) for r in releases]
    # Live RDP vs dp-accounting's RDP within 1%; never below its PLD (the tight bound).
    assert central["epsilon"] == pytest.approx(dp_accounting_epsilon(history, DELTA), rel=0.01)
    assert central["epsilon"] >= dp_accounting_epsilon(history, DELTA, pld=True)
    assert central["epsilon"] <= central["budget_epsilon"] == 8.0

    report = audit(run_dir)  # what `fedmodel audit RUN_DIR` runs, in this process
    assert report.ok, report.all_problems()
    [owner] = [owner for ledger in report.ledgers for owner in ledger.owners]
    assert owner.owner == "central-dp" and owner.rounds == 2
    assert owner.spent_epsilon == pytest.approx(central["epsilon"], rel=1e-9)
    privacy_page = f"/runs/{run_dir.name}/privacy"  # the console's, on this run directory
    [row] = table_rows(fetch(run_dir, privacy_page), "owners")
    assert row[:5] == [
        "central-dp (federation ledger: client-level DP)", "8.000",
        f"{owner.spent_epsilon:.4f}", f"{owner.pld_epsilon:.4f}", f"{owner.remaining:.4f}",
    ]  # fmt: skip
    assert row[-3:] == ["2", "1", "ok"]  # rounds, runs, audit

    ledger_path = run_dir / FEDERATION_LEDGER
    target = PrivacyLedger(ledger_path).entries()[2]  # entry #3: round 2's write-ahead entry
    content = ledger_path.read_bytes()
    stored = struct.pack(">d", target.created_at)  # SQLite's REAL: a big-endian double
    assert content.count(stored) == 1
    position = content.index(stored) + 7
    flipped = bytes([content[position] ^ 1])
    ledger_path.write_bytes(content[:position] + flipped + content[position + 1 :])
    result = audit_cli(run_dir)
    assert result.returncode == 1
    assert f"{FEDERATION_LEDGER}: entry #3 content does not match its SHA-256" in result.stdout
    page = fetch(run_dir, privacy_page)
    assert re.search(r'<tr class="failed">\s*<td>central-dp <em>\(federation ledger', page)
    assert "entry #3 content does not match its SHA-256" in table_rows(page, "owners")[0][-1]
