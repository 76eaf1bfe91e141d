"""The federation page's data: enrolled nodes and the verified audit log, and revocation.

Through the same functions `fedmodel server nodes`, `server audit` and `server revoke`
use (server/enrollment.py), so the console shows and does exactly what the CLI does:
live status from Flower's registry, the audit log checked (chain, MACs, head) before a
line of it is shown, refusals read from the SuperLink's log first. Each node's privacy
budget is what it last released in a run under the federation's runs/ (summary.json),
and the rounds it refused there are counted by reason: the owners' ledgers and logs stay
on their nodes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmodel.console.privacy import ReleasedBudgetRow, latest_released
from fedmodel.console.runs import REFUSED_BY_NODE, RunsRoot, RunView
from fedmodel.errors import FedModelError
from server.enrollment import (
    NOT_ENROLLED,
    list_nodes,
    load_registry,
    record_refusals,
    revoke_node,
    verify_audit,
)
from server.superlink import Federation

FEDERATION_FILE = "federation.toml"


def is_federation_directory(path: Path) -> bool:
    return (path / FEDERATION_FILE).is_file()


@dataclass(frozen=True)
class FederationView:
    """Nodes (online, offline, revoked; last seen; key fingerprint) and the audit log."""

    directory: Path
    nodes: list[dict[str, Any]]
    nodes_unavailable: str | None  # why live status is missing (SuperLink down), else None
    events: list[dict[str, Any]]
    head: str
    log_problem: str | None  # the verification failure, highlighted; None when verified
    refusals: dict[str, int]  # refused connections by reason, counted
    budgets: list[ReleasedBudgetRow]  # per enrolled node, as it last released its budget
    node_refusals: list[NodeRefusals]  # rounds nodes refused in the runs under runs/

    @classmethod
    def read(cls, directory: Path) -> FederationView:
        federation = Federation.load(directory)
        nodes_unavailable = None
        try:
            record_refusals(federation)
            nodes = [_with_last_seen(node) for node in list_nodes(federation)]
        except FedModelError as error:
            nodes_unavailable = str(error)
            nodes = [
                {**entry, "last_seen": entry.get("revoked_at") or "-"}
                for entry in load_registry(federation).values()
            ]
        try:
            events, head = verify_audit(federation)
            problem = None
        except FedModelError as error:
            events, head, problem = [], "", str(error)
        refusals: Counter[str] = Counter()
        for event in events:
            if event["event"] == "refused":
                refusals[str(event.get("reason"))] += int(event.get("count", 1))
        enrolled = [node["name"] for node in nodes if node["name"] != NOT_ENROLLED]
        runs = _readable_runs(RunsRoot(directory))
        return cls(
            directory, nodes, nodes_unavailable, events, head, problem, dict(refusals),
            latest_released(runs, enrolled), node_refusals(runs),
        )  # fmt: skip


@dataclass(frozen=True)
class NodeRefusals:
    """How many rounds `node` refused for `reason` (its owner's policy or budget), in which
    runs: what each run's summary.json recorded of the node's reply."""

    node: str
    reason: str
    rounds: int
    runs: tuple[str, ...]


def node_refusals(runs: list[RunView]) -> list[NodeRefusals]:
    """The rounds refused in `runs`, by node and reason, most frequent first."""
    rounds: Counter[tuple[str, str]] = Counter()
    seen_in: dict[tuple[str, str], list[str]] = {}
    for run in runs:
        for refusal in run.refusals():
            if refusal["what"] != REFUSED_BY_NODE:
                continue
            key = (str(refusal["client"]), str(refusal["reason"]))
            rounds[key] += 1
            if run.name not in seen_in.setdefault(key, []):
                seen_in[key].append(run.name)
    return [
        NodeRefusals(node, reason, count, tuple(seen_in[node, reason]))
        for (node, reason), count in sorted(rounds.items(), key=lambda item: (-item[1], item[0]))
    ]


def _readable_runs(root: RunsRoot) -> list[RunView]:
    """The runs under `root`, oldest first, but those whose files are broken (the runs
    page names their error)."""
    runs = []
    for name in root.names():
        try:
            runs.append(root.run(name))
        except FedModelError:
            continue
    return runs


def _with_last_seen(node: dict[str, Any]) -> dict[str, Any]:
    """'now' for an online node; else when it went offline (or was revoked), as Flower saw."""
    if node["status"] == "online":
        last_seen = f"now (online since {node.get('online_at') or '?'})"
    elif node["status"] == "revoked":
        last_seen = node.get("offline_at") or node.get("revoked_at") or "-"
    else:
        last_seen = node.get("offline_at") or "never"
    return {**node, "last_seen": last_seen}


def revoke(directory: Path, name: str) -> dict[str, Any]:
    """Revoke node `name` as `fedmodel server revoke` does (it is cut off at once)."""
    federation = Federation.load(directory)
    record_refusals(federation)
    return revoke_node(federation, name)
