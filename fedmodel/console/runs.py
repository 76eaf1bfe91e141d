"""What the console shows of run directories: the list, one run's progress and tables.

Everything is read from the files a run keeps current after every round (metrics.csv
and clients.csv are appended per round, summary.json is rewritten per round; see
server/run_record.py), so a running simulation or deployment and a finished one are
read the same way, and polling these files is the live view.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmodel.errors import FedModelError
from fedmodel.run_directory import (
    CLASSIFIER_SCORING,
    CLIENTS_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    NODES_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    RunSummary,
    Scoring,
)
from simulations.report import baseline_columns, baseline_rows, baseline_verdict, site_name

SERVED_FILES = (SUMMARY_FILE, REPORT_FILE, METRICS_FILE, CLIENTS_FILE, CONFIG_FILE)
"""The run files the console links to and serves as they are; nothing else is served."""


class UnknownRunError(FedModelError):
    """A run name that is not a run directory under the console's PATH."""


def is_run_directory(path: Path) -> bool:
    """A run directory: what `simulate` or `run` writes first (config.json) or last."""
    return (path / CONFIG_FILE).is_file() or (path / SUMMARY_FILE).is_file()


REFUSED_BY_NODE = "refused by its node"  # a round its owner's policy or budget refused


@dataclass(frozen=True)
class RunsRoot:
    """The runs under the console's PATH: PATH itself when it is a run directory, else
    its subdirectories that are (one level down), and a federation directory's runs/."""

    path: Path

    def _directories(self) -> dict[str, Path]:
        """Run name -> directory, in the order the runs were started, newest last."""
        if is_run_directory(self.path):
            return {self.path.name: self.path}
        parents = [self.path, self.path / "runs"]  # `fedmodel run` writes under FED/runs/
        runs = [child for parent in parents if parent.is_dir() for child in parent.iterdir()]
        runs = [child for child in runs if child.is_dir() and is_run_directory(child)]
        return {run.name: run for run in sorted(runs, key=_started_at)}

    def names(self) -> list[str]:
        """Run names (directory names) in the order they were started, newest last."""
        return list(self._directories())

    def directory(self, name: str) -> Path:
        """The directory of run `name`; only names `names()` lists are accepted."""
        directories = self._directories()
        if name not in directories:
            raise UnknownRunError(f"no run named '{name}' under {self.path}")
        return directories[name]

    def run(self, name: str) -> RunView:
        return RunView.read(name, self.directory(name))

    def runs(self) -> list[RunView]:
        return [self.run(name) for name in self.names()]


def _started_at(run_dir: Path) -> tuple[float, str]:
    config = run_dir / CONFIG_FILE
    return (config if config.exists() else run_dir / SUMMARY_FILE).stat().st_mtime, run_dir.name


@dataclass(frozen=True)
class RunView:
    """One run as the console shows it, read afresh from its files."""

    name: str
    directory: Path
    summary: RunSummary | None  # None until the first round's summary.json
    config: dict[str, Any]
    metric_rows: list[dict[str, float | None]]  # metrics.csv, one per evaluated round
    client_rows: list[dict[str, Any]]  # clients.csv, one per client reply
    node_names: dict[str, str]  # a deployed run's client number -> node name

    @classmethod
    def read(cls, name: str, directory: Path) -> RunView:
        summary = RunSummary.load(directory) if (directory / SUMMARY_FILE).is_file() else None
        config = summary.config if summary else _read_config(directory)
        return cls(
            name,
            directory,
            summary,
            config,
            [_numbers(row) for row in _read_csv(directory / METRICS_FILE)],
            _read_csv(directory / CLIENTS_FILE),
            _node_names(directory),
        )

    @property
    def deployed(self) -> bool:
        """A run of `fedmodel run` on enrolled nodes (its owners' ledgers stay on them)."""
        return self.config.get("scenario") == "deployment"

    @property
    def scoring(self) -> Scoring:
        return self.summary.scoring if self.summary is not None else CLASSIFIER_SCORING

    @property
    def planned_rounds(self) -> int:
        return self.summary.planned_rounds if self.summary else int(self.config.get("rounds", 0))

    @property
    def status(self) -> str:
        """'starting' (no round yet), 'running', 'stopped early: ...' or 'completed'."""
        if self.summary is None:
            return "starting"
        if self.summary.stopped_early:
            return f"stopped early: {self.summary.stopped_early}"
        return "completed" if self.summary.completed else "running"

    @property
    def title(self) -> str:
        scenario = self.summary.scenario if self.summary else self.config.get("scenario", "?")
        dataset = self.summary.dataset if self.summary else self.config.get("dataset", "?")
        return f"{scenario} / {dataset}"

    @property
    def files(self) -> list[str]:
        """The served files this run has (summary.json, report.md, ...)."""
        return [name for name in SERVED_FILES if (self.directory / name).is_file()]

    @property
    def headline(self) -> tuple[str, float | None]:
        """(label, value) of the last evaluated round's headline metric."""
        scoring = self.scoring
        value = self.metric_rows[-1].get(scoring.headline) if self.metric_rows else None
        return scoring.headline_label, value

    @property
    def max_epsilon(self) -> float | None:
        """The largest sample-level epsilon any client reported so far; None without any."""
        epsilons = [_number(row.get("epsilon")) for row in self.client_rows]
        reported = [epsilon for epsilon in epsilons if epsilon is not None]
        return max(reported) if reported else None

    def progress(self) -> dict[str, Any]:
        """The live part of the page as JSON: status, rounds, and both charts' data."""
        scoring = self.scoring
        return {
            "status": self.status,
            "rounds": len(self.metric_rows),
            "planned_rounds": self.planned_rounds,
            "has_baselines": bool(self.summary and self.summary.baselines),
            "files": self.files,
            "metrics": {
                "rounds": [row.get("round") for row in self.metric_rows],
                "series": {
                    scoring.label(name): [row.get(name) for row in self.metric_rows]
                    for name in scoring.columns
                },
            },
            "epsilon": self.epsilon_by_client(),
        }

    def epsilon_by_client(self) -> dict[str, list[list[float]]]:
        """Each client's (round, epsilon) points, as clients.csv recorded them per reply."""
        points: dict[str, list[list[float]]] = {}
        for row in self.client_rows:
            epsilon = _number(row.get("epsilon"))
            if epsilon is not None:
                client = self.client_name(str(row["client"]))
                points.setdefault(client, []).append([float(row["round"]), epsilon])
        return dict(sorted(points.items()))

    def client_name(self, client: str) -> str:
        """A deployed client's node name, a simulated one's site name where the data
        names its sites, else its number."""
        if client in self.node_names:
            return self.node_names[client]
        return site_name(self.summary, client) if self.summary else client

    def baselines(self) -> tuple[tuple[str, ...], list[tuple[str, ...]], str] | None:
        """(columns, rows, verdict) of the federated model beside its baselines."""
        if self.summary is None or not self.summary.baselines or self.summary.final is None:
            return None
        return (
            baseline_columns(self.summary.scoring),
            baseline_rows(self.summary),
            baseline_verdict(self.summary),
        )

    def heterogeneity(self) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        """(per-client rows, federation-level measures) where the harness measured them."""
        measured = self.summary.heterogeneity if self.summary else None
        if not measured:
            return None
        rows = [{**row, "client": self.client_name(row["client"])} for row in measured["clients"]]
        overall = {key: value for key, value in measured.items() if key != "clients"}
        return rows, overall

    def refusals(self) -> list[dict[str, Any]]:
        """Rounds a node refused (its owner's policy or budget) and updates the coordinator
        rejected (malformed, non-finite, too large), each with its round and reason."""
        if self.summary is None:
            return []
        kinds = ((REFUSED_BY_NODE, self.summary.dropouts),
                 ("rejected by the coordinator", self.summary.rejected_updates))  # fmt: skip
        return [
            {
                "round": entry.get("round"),
                "client": self.client_name(str(entry["client"]))
                if entry.get("client") is not None
                else f"node {entry.get('node_id')}",
                "what": what,
                "reason": entry.get("reason", ""),
            }
            for what, entries in kinds
            for entry in entries
        ]


def privacy_utility(runs: list[RunView]) -> list[dict[str, Any]]:
    """One point per run with an epsilon and a last headline value. The epsilon is the
    largest sample-level one over clients, else (--dp client) the client-level one."""
    points = []
    for run in runs:
        label, value = run.headline
        epsilon, level = run.max_epsilon, "sample"
        central = run.summary.client_level_dp if run.summary else None
        if epsilon is None and central:
            epsilon, level = central.get("epsilon"), "client"
        if epsilon is not None and value is not None:
            points.append(
                {"run": run.name, "epsilon": epsilon, "level": level, "metric": label,
                 "value": value}
            )  # fmt: skip
    return points


def _node_names(directory: Path) -> dict[str, str]:
    """Client number -> node name, from the nodes.json a deployed run writes as it starts
    (its coordinator's numbering); empty for a simulation or an unreadable file."""
    try:
        positions = json.loads((directory / NODES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(positions, dict):
        return {}
    return {str(number): str(name) for name, number in positions.items()}


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        raw = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """Complete rows only: a row being appended right now has no line end yet."""
    try:
        text = path.read_text()
    except OSError:
        return []
    complete = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(complete.splitlines()))


def _number(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except ValueError:
        return None


def _numbers(row: dict[str, Any]) -> dict[str, float | None]:
    return {key: _number(value) for key, value in row.items()}
