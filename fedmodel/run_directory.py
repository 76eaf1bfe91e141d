"""A run's directory: the names of what a run leaves behind, and summary.json as a type.

The coordinator writes summary.json after every round (server/run_record.py), the
harness adds what only it knows (timing, the federation, baselines), and audit, reports
and the CLI read it back. All of them go through `RunSummary`, so its keys are defined
once; the JSON on disk keeps the shape earlier runs have.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmodel.errors import ExitCode, FedModelError, TaskError

if TYPE_CHECKING:
    from fedmodel.task import Task

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"  # the run config; `--resume` starts again from it
REPORT_FILE = "report.md"
REPORT_HTML_FILE = "report.html"  # report.md as one self-contained page, plots inside
METRICS_FILE = "metrics.csv"  # one row per round
CLIENTS_FILE = "clients.csv"  # one row per client reply
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"  # the final model file (fedmodel.model_file): what `fedmodel predict` reads
ROUND_MODELS_DIR = "models"  # with --save-round-models: round-NNNN/, one model file each
LEDGERS_DIR = "ledgers"  # the simulated clients' privacy ledgers, unless --ledger-dir
ENGINE_DIR = "engine"  # the engine's app and logs
NODES_FILE = "nodes.json"  # a deployed run's node name -> client number, stable across --resume

JsonObject = dict[str, Any]

# summary.json's client_level_dp["mechanism"]: who adds the noise, hence whom it protects from
CENTRAL_MECHANISM = "Gaussian on the coordinator"  # --dp client
DISTRIBUTED_MECHANISM = "distributed discrete Gaussian under SecAgg+"  # --dp distributed


def client_level_mechanism(block: JsonObject) -> str:
    """A summary's client-level DP mechanism; summaries from before the field had only
    the coordinator's."""
    return str(block.get("mechanism", CENTRAL_MECHANISM))


def describe_client_level_dp(block: JsonObject) -> str:
    """A summary's client-level DP in one console line: epsilon, and who added the noise."""
    return (
        f"Client-level epsilon (whole clients, {client_level_mechanism(block)}): "
        f"{block['epsilon']:.3f} at delta {block['delta']:g} "
        f"({str(block['accountant']).upper()} accountant, {len(block['releases'])} releases)"
    )


class SummaryError(FedModelError):
    """A summary.json that is not JSON, lacks a key or has one no FedModel writes."""

    exit_code = ExitCode.RUN_DIRECTORY


METRIC_LABELS = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "recall_at_1pct_fpr": "recall at 1% FPR",
    "r2": "R2",
    "mse": "MSE",
    "mae": "MAE",
}
"""How reports write the built-in metrics; any other name is written as it is."""


@dataclass(frozen=True)
class Scoring:
    """How a run's models are scored: the task's metrics in report order, the one reports
    lead with, and those where lower is better. "loss" is always scored besides them.

    Plain names, so that reading a run directory imports no task (and no torch);
    `Scoring.of(task)` builds it from a Task, and summary.json records it.
    """

    metric_names: tuple[str, ...]
    headline: str
    lower_is_better: frozenset[str]

    @classmethod
    def of(cls, task: Task) -> Scoring:
        """The scoring of `task`; a headline the task does not score is a TaskError."""
        from fedmodel.task import LOWER_IS_BETTER

        names = task.metric_names
        lower = LOWER_IS_BETTER.intersection((*names, "loss"))
        scoring = cls(names, task.headline_metric, lower)
        if scoring.headline not in scoring.columns:
            raise TaskError(
                f"task '{task.name}': headline '{scoring.headline}' is not one of its metrics "
                f"({', '.join(scoring.columns)}); name one of them or leave headline empty"
            )
        return scoring

    @property
    def columns(self) -> tuple[str, ...]:
        """Every scored value, in report order: the task's metrics, then the loss."""
        return (
            (*self.metric_names, "loss") if "loss" not in self.metric_names else self.metric_names
        )

    @property
    def headline_label(self) -> str:
        """The headline metric as reports write it."""
        return self.label(self.headline)

    @staticmethod
    def label(name: str) -> str:
        """A metric's name as reports write it."""
        return METRIC_LABELS.get(name, name)

    def described(self, scores: Mapping[str, Any], skip_missing: bool = False) -> list[str]:
        """Each scored value as 'LABEL value', the headline first; '-' for a None value
        (undefined or not scored), or none at all with `skip_missing`."""
        ordered = (self.headline, *(name for name in self.columns if name != self.headline))
        return [
            f"{self.label(name)} " + ("-" if scores.get(name) is None else f"{scores[name]:.4f}")
            for name in ordered
            if not (skip_missing and scores.get(name) is None)
        ]

    def improvement(self, name: str, difference: float) -> float:
        """`difference` (new minus old) of metric `name` signed so that positive is better."""
        return -difference if name in self.lower_is_better else difference

    def to_json(self) -> JsonObject:
        return {
            "metrics": list(self.metric_names),
            "headline": self.headline,
            "lower_is_better": sorted(self.lower_is_better),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], source: Path | str = SUMMARY_FILE) -> Scoring:
        """Read `to_json`'s form; anything else is a SummaryError naming the file."""
        try:
            return cls(
                tuple(raw["metrics"]), str(raw["headline"]), frozenset(raw["lower_is_better"])
            )
        except (KeyError, TypeError) as error:
            raise SummaryError(f"{source}: 'scoring' is malformed ({error})") from None


CLASSIFIER_SCORING = Scoring(
    ("auroc", "auprc", "recall_at_1pct_fpr", "accuracy"), "auroc", frozenset({"loss"})
)
"""The tabular classifier's scoring: deployed runs' (nodes score it on their hold-outs),
and every run recorded before summaries named their scoring."""


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """summary.json: what a run was asked to do, what it did, and what it spent.

    Nested blocks (per-round rows, per-client privacy, the config) stay JSON objects:
    their columns are metrics.csv's and clients.csv's, defined in server/run_record.py.
    """

    scenario: str
    dataset: str
    rounds: int  # rounds evaluated so far
    planned_rounds: int
    completed: bool
    num_clients: int
    dp_mode: str | None = None  # absent from runs before client-level DP
    dp: bool  # sample-level DP-SGD on the clients
    delta: float | None  # the following three: None without sample-level DP
    target_epsilon: float | None
    accountant: str | None
    client_level_dp: JsonObject | None = None  # client-level DP: mechanism, epsilon, releases
    final: JsonObject | None  # the last evaluated global model's metrics
    initial: JsonObject | None  # the initial model's, before any round
    per_round: list[JsonObject]
    clients: list[JsonObject]
    stopped_early: str | None = None
    dropouts: list[JsonObject] = field(default_factory=list)
    rejected_updates: list[JsonObject] = field(default_factory=list)
    config: JsonObject
    software: dict[str, str] | None = None
    scoring: Scoring = CLASSIFIER_SCORING  # what `final` and `per_round` hold
    # Added by `fedmodel simulate` once the run is over; absent from deployed runs
    seconds: float | None = None
    federation: JsonObject | None = None
    heterogeneity: JsonObject | None = None
    baselines: JsonObject | None = None

    @property
    def scored_on(self) -> str:
        """What `final` and `per_round` were scored on: "validation" rows held out of the
        clients' training rows (`--validation-fraction`, a sweep's stage 1) or the "test" set."""
        return "validation" if self.config.get("validation_fraction", 0) > 0 else "test"

    def to_json(self) -> JsonObject:
        """The JSON object on disk; the harness's blocks only where the harness wrote them."""
        return {
            key.name: self.scoring.to_json() if key.name == "scoring" else getattr(self, key.name)
            for key in fields(self)
            if not (key.name in _HARNESS_KEYS and getattr(self, key.name) is None)
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], source: Path | str = SUMMARY_FILE) -> RunSummary:
        """Read `to_json`'s form; an unknown or missing key is a SummaryError naming it."""
        if not isinstance(raw, Mapping):
            raise SummaryError(f"{source}: not a JSON object")
        for key in raw:
            if key not in _KEYS:
                raise SummaryError(f"{source}: unknown key '{key}'")
        for key in _REQUIRED_KEYS:
            if key not in raw:
                raise SummaryError(f"{source}: missing key '{key}'")
        if "scoring" in raw:
            return cls(**{**raw, "scoring": Scoring.from_json(raw["scoring"], source)})
        return cls(**raw)

    @classmethod
    def load(cls, run_dir: Path) -> RunSummary:
        """The summary.json of `run_dir`."""
        path = run_dir / SUMMARY_FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise SummaryError(f"{path}: cannot read it ({error})") from None
        return cls.from_json(raw, path)

    @classmethod
    def of_completed_run(cls, run_dir: Path) -> RunSummary | None:
        """The summary of a run that finished; None if it never wrote one or stopped short."""
        if not (run_dir / SUMMARY_FILE).exists():
            return None
        summary = cls.load(run_dir)
        return summary if summary.completed else None

    def save(self, run_dir: Path) -> None:
        """Rewrite `run_dir`'s summary.json atomically (a crash leaves the previous one)."""
        write_json_atomic(run_dir / SUMMARY_FILE, self.to_json())

    @property
    def final_metrics(self) -> JsonObject:
        """`final`, for a run that evaluated a model (every completed run did)."""
        if self.final is None:
            raise SummaryError(f"{SUMMARY_FILE}: no evaluated model ('final' is null)")
        return self.final

    @property
    def max_epsilon(self) -> float | None:
        """The largest sample-level epsilon any client reported; None without any."""
        epsilons = [c["epsilon"] for c in self.clients if c.get("epsilon") is not None]
        return max(epsilons) if epsilons else None


_KEYS = frozenset(key.name for key in fields(RunSummary))
_HARNESS_KEYS = frozenset({"seconds", "federation", "heterogeneity", "baselines"})
# Keys every summary since the first has; the others have defaults (added later)
_REQUIRED_KEYS = tuple(
    key.name
    for key in fields(RunSummary)
    if key.default is MISSING and key.default_factory is MISSING
)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write `payload` as JSON so that readers see the old file or the new one, never half."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    os.replace(partial, path)
