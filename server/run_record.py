"""What a run leaves behind: metrics.csv, clients.csv and summary.json, kept current.

Files are rewritten (atomically) or appended after every round, so a crash loses at most
the round in flight. The progress line logged per round is what `fedmodel simulate`
shows instead of raw engine logs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from functools import cache
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from fedmodel.config import RunConfig
from fedmodel.privacy.accountant import ACCOUNTANT
from fedmodel.privacy.central import FEDERATION_LEDGER, CentralRelease
from fedmodel.privacy.distributed_accounting import DistributedRelease
from fedmodel.privacy.distributed_ledger import release_segment
from fedmodel.run_directory import (
    CENTRAL_MECHANISM,
    CLIENTS_FILE,
    DISTRIBUTED_MECHANISM,
    METRICS_FILE,
    RunSummary,
    Scoring,
)
from fedmodel.runtime.flwr_run import PROGRESS_MARKER
from server.reply_schema import TrainReport

RUN_COLUMNS = (
    "train_loss",
    "max_epsilon",
    "clients",
    "rejected",
    # failures per round (issue 6): budget dropouts, error replies, no reply before the timeout
    "dropouts",
    "errors",
    "timeouts",
)
"""What metrics.csv holds per round besides the round and its scoring's columns."""
CLIENT_COLUMNS = ("round", "client", "num_examples", "train_loss", "epsilon")


class RunRecorder:
    """Collects per-client replies and per-round evaluations of one run into its directory."""

    def __init__(
        self,
        run_dir: Path,
        config: RunConfig,
        scoring: Scoring,
        resume_from: Mapping[str, Any] | None = None,
    ) -> None:
        """A fresh record, or (`resume_from`: a `state()`) the record of a resumed run.

        `scoring` names the metrics each evaluation holds; they are recorded in its order.
        """
        self.run_dir = run_dir
        self.config = config
        self.scoring = scoring
        self.columns = ("round", *scoring.columns, *RUN_COLUMNS)
        self.rounds: list[dict[str, Any]] = []
        self.clients: dict[str, dict[str, Any]] = {}
        self._round_clients: dict[int, list[str]] = {}
        self._round_train_loss: dict[int, float] = {}
        self.initial: dict[str, float | None] | None = None
        self.dropouts: list[dict[str, Any]] = []
        self.rejections: list[dict[str, Any]] = []
        self.central_releases: list[dict[str, Any]] = []
        self.failures: dict[int, dict[str, int]] = {}
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            self._restore(resume_from)
            return
        _start_csv(run_dir / METRICS_FILE, self.columns)
        _start_csv(run_dir / CLIENTS_FILE, CLIENT_COLUMNS)

    _STATE = ("rounds", "clients", "initial", "dropouts", "rejections", "central_releases")

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to go on recording as if it had never stopped."""
        return {
            **{name: getattr(self, name) for name in self._STATE},
            "round_clients": self._round_clients,
            "round_train_loss": self._round_train_loss,
            "failures": self.failures,
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        """Take back `state()`; drop CSV rows of rounds after it (in flight at the crash)."""
        for name in self._STATE:
            setattr(self, name, state[name])
        self._round_clients = dict(state["round_clients"])
        self._round_train_loss = dict(state["round_train_loss"])
        self.failures = dict(state["failures"])
        last = self.rounds[-1]["round"] if self.rounds else 0
        for name in (METRICS_FILE, CLIENTS_FILE):
            _keep_rows_up_to(self.run_dir / name, last)

    def record_failures(self, server_round: int, errors: int, timeouts: int, dropouts: int) -> None:
        """Sampled clients whose update never arrived: error replies (a crashed or killed
        node included), no reply within the round timeout, budget dropouts."""
        self.failures[server_round] = {"errors": errors, "timeouts": timeouts, "dropouts": dropouts}

    def record_replies(
        self,
        server_round: int,
        reports: Mapping[str, TrainReport],
        weights: Mapping[str, float] | None = None,
    ) -> None:
        """Store each client's validated training report; None marks a withheld field.

        `weights` are the aggregation weights the coordinator gave the clients (the
        reported example counts where absent); the mean training loss uses them.
        """
        rows, losses, loss_weights = [], [], []
        for client, report in reports.items():
            entry = self.clients.setdefault(client, {"client": client, "epsilon_by_round": []})
            weight = (weights or {}).get(client, report.num_examples or 1)
            entry |= {"num_examples": report.num_examples, "weight": weight}
            if self.config.sample_dp and report.epsilon is not None:
                entry |= {
                    "epsilon": report.epsilon,
                    "delta": report.delta,
                    "accountant": ACCOUNTANT,
                    "history": [list(segment) for segment in report.history],
                    "budget": asdict(report.budget) if report.budget else None,
                }
                entry["epsilon_by_round"].append([server_round, report.epsilon])
            else:
                entry |= {"epsilon": None, "delta": None, "accountant": None, "history": [],
                          "budget": None}  # fmt: skip
            if report.train_loss is not None:  # deployed owners withhold it by default
                losses.append(report.train_loss * weight)
                loss_weights.append(weight)
            rows.append([server_round, client, report.num_examples, report.train_loss,
                         report.epsilon])  # fmt: skip
            self._round_clients.setdefault(server_round, []).append(client)
        if loss_weights:
            self._round_train_loss[server_round] = sum(losses) / sum(loss_weights)
        _append_csv(self.run_dir / CLIENTS_FILE, rows)

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

    def record_central_release(self, release: CentralRelease, epsilon: float) -> None:
        """A round's client-level DP release, as the federation ledger committed it."""
        self.central_releases.append(
            {
                "round": release.server_round,
                "noise_multiplier": release.noise_multiplier,
                "clipped_count_stddev": release.count_stddev,
                "effective_noise_multiplier": release.effective_noise_multiplier,
                "clipping_norm": release.clipping_norm,
                "sample_rate": release.sample_rate,
                "epsilon": epsilon,
            }
        )

    def record_distributed_release(self, release: DistributedRelease, epsilon: float) -> None:
        """A round's distributed-DP release (--dp distributed), in the same rows as the
        server's: the sum's noise over the clip norm, no count noise, every survivor."""
        noise_multiplier = release_segment(release)[0]
        self.central_releases.append(
            {
                "round": release.server_round,
                "noise_multiplier": noise_multiplier,
                "clipped_count_stddev": 0.0,
                "effective_noise_multiplier": noise_multiplier,
                "clipping_norm": release.parameters.clip_norm,
                "sample_rate": 1.0,
                "epsilon": epsilon,
                "survivors": release.clients,
            }
        )

    def _client_level_dp(self) -> dict[str, Any] | None:
        """Client-level epsilon (cumulative) and every release, for the server's Gaussian
        mechanism (--dp client) or the clients' distributed one; None without either."""
        config = self.config
        if not (config.client_dp or config.distributed_dp):
            return None
        releases = self.central_releases
        budget = config.distributed_epsilon if config.distributed_dp else config.central_epsilon
        return {
            "mechanism": DISTRIBUTED_MECHANISM if config.distributed_dp else CENTRAL_MECHANISM,
            "epsilon": releases[-1]["epsilon"] if releases else 0.0,
            "delta": config.delta,
            "budget_epsilon": budget or None,
            "accountant": ACCOUNTANT,  # RDP, composed over rounds, for both
            "adaptive_clipping": config.central_adaptive,
            "ledger": FEDERATION_LEDGER,
            "releases": releases,
        }

    def record_evaluation(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Store the central evaluation after a round, refresh files, log one progress line.

        A score that is undefined (AUROC of a one-class test set) or not scored (deployed
        nodes score no AUPRC) is recorded as None.
        """
        scores = {name: _finite_or_none(metrics.get(name)) for name in self.scoring.columns}
        if server_round == 0:
            self.initial = scores
            return
        epsilons = [c["epsilon"] for c in self.clients.values() if c.get("epsilon") is not None]
        row = {
            "round": server_round,
            **scores,
            "train_loss": self._round_train_loss.get(server_round),  # None: withheld
            "max_epsilon": max(epsilons) if epsilons else None,
            "clients": len(self._round_clients.get(server_round, [])),
            "rejected": sum(1 for r in self.rejections if r["round"] == server_round),
            **self.failures.get(server_round, {"dropouts": 0, "errors": 0, "timeouts": 0}),
        }
        self.rounds.append(row)
        _append_csv(self.run_dir / METRICS_FILE, [[row[c] for c in self.columns]])
        self.write_summary(completed=False)
        progress = {**row, "rounds": self.config.rounds, "scoring": self.scoring.to_json()}
        log(INFO, "%s%s", PROGRESS_MARKER, json.dumps(progress))

    def write_summary(self, completed: bool, stopped_early: str | None = None) -> RunSummary:
        """Rewrite summary.json; `stopped_early` says why a run ended before its last round.

        `final` is the last evaluated global model's scores (the initial one's when no
        round trained).
        """
        final = self.rounds[-1] if self.rounds else self.initial
        sample_dp = self.config.sample_dp
        summary = RunSummary(
            scenario=self.config.scenario,
            dataset=self.config.dataset,
            rounds=len(self.rounds),
            planned_rounds=self.config.rounds,
            completed=completed,
            num_clients=self.config.clients,
            dp_mode=self.config.dp,
            dp=sample_dp,
            delta=self.config.delta if sample_dp else None,
            target_epsilon=self.config.epsilon if sample_dp else None,
            accountant=ACCOUNTANT if sample_dp else None,
            client_level_dp=self._client_level_dp(),
            final={name: final[name] for name in self.scoring.columns} if final else None,
            initial=self.initial,
            per_round=self.rounds,
            clients=sorted(self.clients.values(), key=lambda c: int(c["client"])),
            stopped_early=stopped_early,
            dropouts=self.dropouts,
            rejected_updates=self.rejections,
            config=asdict(self.config.relative_to(self.run_dir)),
            software=software_versions(),
            scoring=self.scoring,
        )
        summary.save(self.run_dir)
        return summary


def _finite_or_none(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def software_versions() -> dict[str, str]:
    """Versions of what produced the run, and a digest of the code itself (a version does
    not change between commits; the code's path would name this machine)."""
    from importlib.metadata import version

    return {
        **{name: version(name) for name in ("fedmodel", "flwr", "opacus", "torch")},
        "code_digest": code_digest(Path(__file__).resolve().parents[1]),
    }


CODE_PACKAGES = ("fedmodel", "server", "client", "simulations")


@cache
def code_digest(root: Path) -> str:
    """SHA-256 (first 16 hex digits) of the Python sources of FedModel's packages under
    `root`, by their paths relative to it: the same code gives the same digest anywhere."""
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _start_csv(path: Path, columns: Iterable[str]) -> None:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerow(columns)


def _keep_rows_up_to(path: Path, last_round: int) -> None:
    """Rewrite a per-round CSV (atomically) without the rows of rounds after `last_round`."""
    with path.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *(r for r in rows if int(r[0]) <= last_round)])
    os.replace(partial, path)


def _append_csv(path: Path, rows: Iterable[Iterable[Any]]) -> None:
    with path.open("a", newline="") as handle:
        csv.writer(handle).writerows(rows)
