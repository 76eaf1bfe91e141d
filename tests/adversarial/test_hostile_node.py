"""The test plays a hostile data owner in a real TLS federation on 127.0.0.1.

Three enrolled nodes: two honest ones and `site-z`, whose node runs a copy of
FedModel's source with its executor's `released` (the last step before a reply
leaves the node) rewritten to follow plan.json in that copy: it alters train, evaluate
or query replies as each test asks. Every run is `fedmodel run --min-clients 2`: it
completes with the honest nodes, and each bad reply is in summary.json's
`rejected_updates` with its reason; no report of the hostile node sets its weight,
another node's row, the federation's scores or everyone's encoding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.federation import (
    copy_source_tree,
    join_node,
    served_federation,
    wait_until_online,
    write_sites,
)
from tests.federation import fedmodel as fedmodel_cli

pytestmark = pytest.mark.slow

HONEST_SITES = ("site-a", "site-b")  # clients 0 and 1: numbers follow name order
HOSTILE = "site-z"  # client 2
BUDGET = 10  # each owner's; the four runs spend about 1
# What site-z's executor does to its replies, put into its copy of client/executor.py
# (before the `__main__` guard: the executor runs as `python -m client.executor`)
MAIN_GUARD = """\nif __name__ == "__main__":"""
TAMPERING = '''

# --- the hostile node of tests/adversarial/test_hostile_node.py ------------------------
_honest_released = released
_PLAN = Path(__file__).resolve().parents[1] / "plan.json"


def released(policy: OwnerPolicy, reply: Message) -> Message:
    """The honest release, then what plan.json says: metric overrides (null deletes;
    "train" is a list, one per train reply), a shift of the model, extra categories."""
    import json

    import numpy as np
    from flwr.app import Array, ArrayRecord

    reply = _honest_released(policy, reply)
    if reply.has_error() or not _PLAN.exists():
        return reply
    plan = json.loads(_PLAN.read_text())
    kind = reply.metadata.message_type
    if kind == "query" and "categories" in plan:
        answer = reply.content.config_records["statistics"]
        statistics = json.loads(str(answer["feature-statistics"]))
        statistics["categories"] |= plan["categories"]
        answer["feature-statistics"] = json.dumps(statistics)
        return reply
    changes = {}
    if kind == "train" and plan.get("train"):
        changes = plan["train"].pop(0)
        _PLAN.write_text(json.dumps(plan))
    if kind == "evaluate":
        changes = plan.get("evaluate", {})
    if changes:
        metrics = dict(reply.content.metric_records["metrics"])
        metrics |= changes
        reply.content["metrics"] = MetricRecord(
            {key: value for key, value in metrics.items() if value is not None}
        )
    if kind == "train" and plan.get("shift-norm"):
        arrays = reply.content.array_records["arrays"]
        size = sum(array.numpy().size for array in arrays.values())
        step = np.float32(plan["shift-norm"] / np.sqrt(size))
        reply.content["arrays"] = ArrayRecord(
            {name: Array(array.numpy() + step) for name, array in arrays.items()}
        )
    return reply

'''


@dataclasses.dataclass
class Federation:
    root: Path
    server: Path
    plan: Path  # site-z follows it
    runs: int = 0

    def run(self, plan: dict[str, Any], *options: str | float) -> dict[str, Any]:
        """One `fedmodel run` while site-z follows `plan`; its summary.json."""
        self.plan.write_text(json.dumps(plan))
        self.runs += 1
        output = self.root / f"run-{self.runs}"
        result = fedmodel_cli(
            "run", "--dir", self.server, "--min-clients", 2, "--rounds", 1, "--epsilon", 0.5,
            "--batch-size", 32, "--round-timeout", 120, "--output", output, *options,
            timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        summary: dict[str, Any] = json.loads((output / "summary.json").read_text())
        assert summary["completed"] and summary["stopped_early"] is None
        return summary


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("hostile-node")
    code = root / "code"
    copy_source_tree(code)
    executor = code / "client" / "executor.py"
    honest, guard, main = executor.read_text().rpartition(MAIN_GUARD)
    assert guard, "the executor's __main__ guard moved"
    executor.write_text(honest + TAMPERING + guard + main)
    with served_federation(root) as (space, server):
        sites = [*HONEST_SITES, HOSTILE]
        data = write_sites(root, sites)
        for site in sites:
            # site-z's owner approves (at init) the code it runs: the tampering is its own
            env = {**os.environ, "PYTHONPATH": str(code)} if site == HOSTILE else None
            join_node(space, server, root / site, data[site], BUDGET, env)
        wait_until_online(server, 3)
        yield Federation(root, server, code / "plan.json")


def rejections(summary: dict[str, Any]) -> list[tuple[int, str | None, str]]:
    return [(r["round"], r["client"], r["reason"]) for r in summary["rejected_updates"]]


def honest_rows(summary: dict[str, Any]) -> None:
    """Both honest nodes trained and are recorded under their registry names."""
    rows = {client["node"]: client for client in summary["clients"]}
    for number, site in enumerate(HONEST_SITES):
        assert rows[site]["client"] == str(number)
        assert 0 < rows[site]["epsilon"] <= BUDGET  # all its runs on this dataset so far


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
    assert weights == {"site-a": 1, "site-b": 1, HOSTILE: 1}
    assert {c["node"]: c["num_examples"] for c in summary["clients"]}[HOSTILE] == 10**8
    checkpoints = federation.root / f"run-{federation.runs}" / "checkpoints"
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
    assert HOSTILE not in {client["node"] for client in summary["clients"]}
    ((_, client, spoof), (_, _, evaluation)) = rejections(summary)
    assert client == "2" and spoof.startswith("reports partition-id 0, but node ")
    assert spoof.endswith(" is client 2")
    assert evaluation.startswith("evaluation of round 1: 'auroc-weight' must be a whole number")
    assert summary["final"]["auroc"] < 1.0


def test_poisoned_statistics_leave_their_node_out(federation: Federation) -> None:
    plan = {"categories": {"patient-id": [f"p{n}" for n in range(10_000)]}}
    summary = federation.run(plan)
    honest_rows(summary)
    assert HOSTILE not in {client["node"] for client in summary["clients"]}
    assert rejections(summary) == [
        (0, None, "feature statistics: column 'patient-id' has 10000 categories (at most 50)")
    ]
