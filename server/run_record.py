"""What a run leaves behind: metrics.csv, clients.csv and summary.json, kept current.

Files are rewritten (atomically) or appended after every round, so a crash loses at most
the round in flight. The progress line logged per round is what `fedmodel simulate`
shows instead of raw engine logs.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from fedmodel.config import RunConfig
from fedmodel.privacy.accountant import ACCOUNTANT, history_from_fields

PROGRESS_MARKER = "fedmodel-progress "
ROUND_COLUMNS = (
    "round",
    "auroc",
    "accuracy",
    "loss",
    "train_loss",
    "max_epsilon",
    "clients",
    "rejected",
    "auprc",
    "recall_at_1pct_fpr",
)
FINAL_METRICS = ("auroc", "accuracy", "loss", "auprc", "recall_at_1pct_fpr")
CLIENT_COLUMNS = ("round", "client", "num_examples", "train_loss", "epsilon")


class RunRecorder:
    """Collects per-client replies and per-round evaluations of one run into its directory."""

    def __init__(self, run_dir: Path, config: RunConfig) -> None:
        self.run_dir = run_dir
        self.config = config
        self.rounds: list[dict[str, Any]] = []
        self.clients: dict[str, dict[str, Any]] = {}
        self._round_clients: dict[int, list[str]] = {}
        self._round_train_loss: dict[int, float] = {}
        self.initial: dict[str, float] | None = None
        self.dropouts: list[dict[str, Any]] = []
        self.rejections: list[dict[str, Any]] = []
        run_dir.mkdir(parents=True, exist_ok=True)
        _start_csv(run_dir / "metrics.csv", ROUND_COLUMNS)
        _start_csv(run_dir / "clients.csv", CLIENT_COLUMNS)

    def record_replies(self, server_round: int, replies: Iterable[Mapping[str, Any]]) -> None:
        """Store each client's training metrics (num-examples, loss, epsilon, history)."""
        rows, losses, weights = [], [], []
        for metrics in replies:
            client = str(int(metrics["partition-id"]))
            entry = self.clients.setdefault(client, {"client": client, "epsilon_by_round": []})
            entry["num_examples"] = int(metrics["num-examples"])
            epsilon = None
            if self.config.dp:
                epsilon = float(metrics["epsilon"])
                entry |= {
                    "epsilon": epsilon,
                    "delta": float(metrics["delta"]),
                    "accountant": ACCOUNTANT,
                    "history": [list(segment) for segment in history_from_fields(metrics)],
                }
                entry["epsilon_by_round"].append([server_round, epsilon])
            else:
                entry |= {"epsilon": None, "delta": None, "accountant": None, "history": []}
            loss = float(metrics["train-loss"])
            losses.append(loss * entry["num_examples"])
            weights.append(entry["num_examples"])
            rows.append([server_round, client, entry["num_examples"], loss, epsilon])
            self._round_clients.setdefault(server_round, []).append(client)
        self._round_train_loss[server_round] = sum(losses) / max(sum(weights), 1)
        _append_csv(self.run_dir / "clients.csv", rows)

    def record_dropout(
        self, server_round: int, node_id: int, client: str | None, reason: str
    ) -> None:
        """A client that refused to train (its owner's budget is spent) and left the run."""
        self.dropouts.append(
            {"round": server_round, "node_id": node_id, "client": client, "reason": reason}
        )
        if client is not None and client in self.clients:
            self.clients[client]["dropped_out_round"] = server_round
        self.write_summary(completed=False)

    def record_rejection(
        self, server_round: int, node_id: int, client: str | None, reason: str
    ) -> None:
        """An update dropped before aggregation (malformed, non-finite or too large)."""
        self.rejections.append(
            {"round": server_round, "node_id": node_id, "client": client, "reason": reason}
        )

    def record_evaluation(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Store the central evaluation after a round, refresh files, log one progress line."""
        if server_round == 0:
            self.initial = dict(metrics)
            return
        epsilons = [c["epsilon"] for c in self.clients.values() if c.get("epsilon") is not None]
        row = {
            "round": server_round,
            "auroc": float(metrics["auroc"]),
            "accuracy": float(metrics["accuracy"]),
            "loss": float(metrics["loss"]),
            "train_loss": self._round_train_loss.get(server_round, math.nan),
            "max_epsilon": max(epsilons) if epsilons else None,
            "clients": len(self._round_clients.get(server_round, [])),
            "rejected": sum(1 for r in self.rejections if r["round"] == server_round),
            # imbalanced tasks (issue 3); None where undefined (a test set of one class)
            "auprc": _finite_or_none(metrics.get("auprc")),
            "recall_at_1pct_fpr": _finite_or_none(metrics.get("recall_at_1pct_fpr")),
        }
        self.rounds.append(row)
        _append_csv(self.run_dir / "metrics.csv", [[row[c] for c in ROUND_COLUMNS]])
        self.write_summary(completed=False)
        log(INFO, "%s%s", PROGRESS_MARKER, json.dumps({**row, "rounds": self.config.rounds}))

    def write_summary(self, completed: bool, stopped_early: str | None = None) -> dict[str, Any]:
        """Rewrite summary.json; `stopped_early` says why a run ended before its last round.

        `final` is the last evaluated global model (the initial one when no round trained).
        """
        final = self.rounds[-1] if self.rounds else self.initial
        summary = {
            "scenario": self.config.scenario,
            "dataset": self.config.dataset,
            "rounds": len(self.rounds),
            "planned_rounds": self.config.rounds,
            "completed": completed,
            "num_clients": self.config.clients,
            "dp": self.config.dp,
            "delta": self.config.delta if self.config.dp else None,
            "target_epsilon": self.config.epsilon if self.config.dp else None,
            "accountant": ACCOUNTANT if self.config.dp else None,
            "final": {k: final[k] for k in FINAL_METRICS} if final else None,
            "initial": self.initial,
            "per_round": self.rounds,
            "clients": sorted(self.clients.values(), key=lambda c: int(c["client"])),
            "stopped_early": stopped_early,
            "dropouts": self.dropouts,
            "rejected_updates": self.rejections,
            "config": asdict(self.config),
            "software": software_versions(),
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary


def _finite_or_none(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def software_versions() -> dict[str, str]:
    """Versions of what produced the run, and where its code was imported from."""
    from importlib.metadata import version

    return {
        **{name: version(name) for name in ("fedmodel", "flwr", "opacus", "torch")},
        "code_path": str(Path(__file__).resolve().parents[1]),
    }


def write_json_atomic(path: Path, payload: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    os.replace(partial, path)


def _start_csv(path: Path, columns: Iterable[str]) -> None:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerow(columns)


def _append_csv(path: Path, rows: Iterable[Iterable[Any]]) -> None:
    with path.open("a", newline="") as handle:
        csv.writer(handle).writerows(rows)
