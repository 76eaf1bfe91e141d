"""The test plays a hostile data owner in a real TLS federation on 127.0.0.1.

The shared federation of tests/conftest.py: two honest nodes and `site-z`, whose node
runs a copy of FedModel whose executor alters train, evaluate or query replies as each
test's plan asks (tests/adversarial/tampered_executor.py). Every run is `fedmodel run
--min-clients 2`: it completes with the honest nodes, and each bad reply is in
summary.json's `rejected_updates` with its reason; no report of the hostile node sets
its weight, another node's row, the federation's scores or everyone's encoding.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.federation import fedmodel as fedmodel_cli
from tests.shared_federation.conftest import (
    HONEST_SITES,
    HOSTILE_SITE,
    SHARED_BUDGET,
    SharedFederation,
)

pytestmark = pytest.mark.slow

# Clients 0 and 1 are HONEST_SITES, client 2 is site-z: numbers follow name order.
# Each owner has SHARED_BUDGET; this file's four runs spend about 1.


@dataclasses.dataclass
class Federation:
    server: Path
    plan: Path  # site-z follows it
    outputs: Path  # the test's runs write here
    runs: int = 0

    @property
    def last_output(self) -> Path:
        return self.outputs / f"run-{self.runs}"

    def run(self, plan: dict[str, Any], *options: str | float) -> dict[str, Any]:
        """One `fedmodel run` while site-z follows `plan`; its summary.json."""
        self.plan.write_text(json.dumps(plan))
        self.runs += 1
        result = fedmodel_cli(
            "run", "--dir", self.server, "--min-clients", 2, "--rounds", 1, "--epsilon", 0.5,
            "--batch-size", 32, "--round-timeout", 120, "--output", self.last_output, *options,
            timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        summary: dict[str, Any] = json.loads((self.last_output / "summary.json").read_text())
        assert summary["completed"] and summary["stopped_early"] is None
        return summary


@pytest.fixture
def federation(shared_federation: SharedFederation, tmp_path: Path) -> Federation:
    return Federation(shared_federation.server, shared_federation.plan, tmp_path)


def rejections(summary: dict[str, Any]) -> list[tuple[int, str | None, str]]:
    return [(r["round"], r["client"], r["reason"]) for r in summary["rejected_updates"]]


def honest_rows(summary: dict[str, Any]) -> None:
    """Both honest nodes trained and are recorded under their registry names."""
    rows = {client["node"]: client for client in summary["clients"]}
    for number, site in enumerate(HONEST_SITES):
        assert rows[site]["client"] == str(number)
        assert 0 < rows[site]["epsilon"] <= SHARED_BUDGET  # all its runs on this dataset so far


def test_malformed_replies_are_rejected_with_their_reasons(federation: Federation) -> None:
    plan = {"train": [{"epsilon": math.nan}, {"history-steps": [1, 2, 3]}]}
    summary = federation.run(plan, "--rounds", 2)
    honest_rows(summary)
    assert rejections(summary) == [
        (1, "2", "'epsilon' must be finite, got nan"),
        (2, "2", "history lists differ in length: {'history-noise-multiplier': 1, "
                 "'history-sample-rate': 1, 'history-steps': 3}"),
    ]  # fmt: skip
    assert [row["clients"] for row in summary["per_round"]] == [2, 2]


def test_an_inflated_count_buys_no_weight_and_the_move_stays_bounded(
    federation: Federation,
) -> None:
    """site-z claims 10^8 rows and shifts the model by 0.9 M; honest nodes barely move
    (lr 1e-9). Uniform weights: the model moves by about 0.9 M / 3, at most M times the
    largest normalised weight; example weights would have moved it by 0.9 M."""
    bound = 1.0
    plan = {"train": [{"num-examples": 10**8}], "shift-norm": 0.9 * bound}
    summary = federation.run(plan, "--max-update-norm", bound, "--lr", 1e-9)
    honest_rows(summary)
    assert rejections(summary) == []
    weights = {client["node"]: client["weight"] for client in summary["clients"]}
    assert weights == {"site-a": 1, "site-b": 1, HOSTILE_SITE: 1}
    assert {c["node"]: c["num_examples"] for c in summary["clients"]}[HOSTILE_SITE] == 10**8
    checkpoints = federation.last_output / "checkpoints"
    before, after = (
        torch.load(checkpoints / f"round-{n:04d}.pt", weights_only=True)["state_dict"]
        for n in (0, 1)
    )
    moved = math.sqrt(sum(float(((after[k] - before[k]) ** 2).sum()) for k in before))
    largest = max(weights.values()) / sum(weights.values())
    assert 0.9 * bound * largest * 0.99 <= moved <= bound * largest


def test_a_spoofed_identity_and_poisoned_evaluation_change_nothing(
    federation: Federation,
) -> None:
    plan = {
        "train": [{"partition-id": 0, "epsilon": 0.0}],  # poses as site-a, spent nothing
        "evaluate": {"auroc": 1.0, "auroc-weight": 10**12},
    }
    summary = federation.run(plan)
    honest_rows(summary)  # site-a's row is site-a's own
    assert HOSTILE_SITE not in {client["node"] for client in summary["clients"]}
    ((_, client, spoof), (_, _, evaluation)) = rejections(summary)
    assert client == "2" and spoof.startswith("reports partition-id 0, but node ")
    assert spoof.endswith(" is client 2")
    assert evaluation.startswith("evaluation of round 1: 'auroc-weight' must be a whole number")
    assert summary["final"]["auroc"] < 1.0


def test_poisoned_statistics_leave_their_node_out(federation: Federation) -> None:
    plan = {"categories": {"patient-id": [f"p{n}" for n in range(10_000)]}}
    summary = federation.run(plan)
    honest_rows(summary)
    assert HOSTILE_SITE not in {client["node"] for client in summary["clients"]}
    assert rejections(summary) == [
        (0, None, "feature statistics: column 'patient-id' has 10000 categories (at most 50)")
    ]
