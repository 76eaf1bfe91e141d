"""A sweep's directory and its runs: each `fedmodel simulate` in a process of its own.

Runs go `jobs` at a time, each in its own session (stopped as a group) on its own share
of the cores, on the local engine. Every finished run's row is added to sweep.csv, which
is written to a temporary file and renamed, so an interrupted write leaves the previous
file whole; rerunning the same sweep skips finished rows, and a run interrupted midway
starts again from nothing. sweep.json holds the sweep's definition: another grid in the
same directory is refused.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedmodel.errors import ConfigError, SimulationError
from fedmodel.run_directory import RunSummary, write_json_atomic
from fedmodel.runtime.processes import (
    plain_lines,
    start_detached,
    stop_group,
    tool_environment,
)
from simulations.sweep_plan import (
    ARMS,
    CONSTANT_LOSS_COLUMN,
    PlannedRun,
    Row,
    SweepDefinition,
)

SWEEP_FILE, CSV_FILE, RUNS_DIR = "sweep.json", "sweep.csv", "runs"
STOP_TIMEOUT_S = 30.0


class SweepDirectory:
    """A sweep's output directory: its definition, its CSV of finished runs, their runs."""

    def __init__(self, path: Path, definition: SweepDefinition) -> None:
        self.path, self.definition = path, definition
        self.columns = [
            "key", "stage", "epsilon", "seed", *definition.keys, "metric", "better",
            *(f"validation_{arm}" for arm in ARMS), *(f"test_{arm}" for arm in ARMS),
            "seconds", "run", *(f"test_loss_{arm}" for arm in ARMS), CONSTANT_LOSS_COLUMN,
        ]  # fmt: skip

    def open(self, command: str) -> None:
        """Start the sweep here, or check that the sweep here is this one (to resume)."""
        stored = self.path / SWEEP_FILE
        wanted = self.definition.to_json()
        if stored.exists():
            found = json.loads(stored.read_text())
            if found.get("definition") != wanted:
                raise ConfigError(
                    f"{self.path} holds another sweep (started by: {found.get('command')}); "
                    "rerun that command to resume it, or pass another --output"
                )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stored, {"definition": wanted, "command": command})

    def rows(self) -> list[Row]:
        """Every finished run's row, in the order they finished."""
        path = self.path / CSV_FILE
        if not path.exists():
            return []
        with path.open(newline="") as file:
            return list(csv.DictReader(file))

    def append(self, row: Row) -> None:
        """Add one finished run's row: the whole CSV is rewritten beside and renamed over,
        so a reader (or an interrupted sweep) only ever sees whole rows."""
        rows = [*self.rows(), row]
        temporary = self.path / f".{CSV_FILE}.tmp"
        with temporary.open("w", newline="") as file:
            writer = csv.DictWriter(file, self.columns)
            writer.writeheader()
            writer.writerows(rows)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(self.path / CSV_FILE)

    def run_dir(self, key: str) -> Path:
        return self.path / RUNS_DIR / key

    def row_of(self, run: PlannedRun, key: str, summary: RunSummary, seconds: float) -> Row:
        """The CSV row of a finished run: the sweep's metric (the scenario's headline unless
        --metric names another) for each arm, under validation_ (stage 1) or test_ (stage
        2); the other three stay empty. Stage 2 also keeps each arm's test log-loss, which
        shows what a choice by ranking did to the probabilities, and the constant
        prediction's (no model), which says what log-loss the base rate alone gets."""
        metric = self.definition.metric or summary.scoring.headline
        if metric not in summary.scoring.columns:
            raise ConfigError(
                f"--metric {metric}: this scenario's runs score "
                f"{', '.join(summary.scoring.columns)}; name one of them"
            )
        scored_on = "validation" if run.stage == 1 else "test"
        row: Row = {column: "" for column in self.columns}
        row |= {
            "key": key,
            "stage": str(run.stage),
            "epsilon": f"{run.epsilon:g}",
            "seed": str(run.seed),
            **dict(run.config),
            "metric": metric,
            "better": "lower" if metric in summary.scoring.lower_is_better else "higher",
            **{f"{scored_on}_{arm}": score for arm, score in _arm_scores(summary, metric)},
            "seconds": f"{seconds:.1f}",
            "run": str(self.run_dir(key).relative_to(self.path)),
        }
        if run.stage == 2:
            row |= {f"test_loss_{arm}": loss for arm, loss in _arm_scores(summary, "loss")}
            constant = ((summary.baselines or {}).get("constant") or {}).get("loss")
            row[CONSTANT_LOSS_COLUMN] = "" if constant is None else f"{constant:.6g}"
        return row


def _arm_scores(summary: RunSummary, metric: str) -> list[tuple[str, str]]:
    """(arm, `metric` as the CSV writes it: empty where that arm has none) for each arm."""
    baselines = summary.baselines or {}
    scores = {
        "federated": summary.final_metrics.get(metric),
        "central_dp": (baselines.get("central_dp") or {}).get(metric),
        "site_alone": (baselines.get("local_mean") or {}).get(metric),
    }
    return [(arm, "" if value is None else f"{value:.6g}") for arm, value in scores.items()]


Progress = Callable[[PlannedRun, Row, int, int], None]
"""Told of each finished run: the run, its row, how many are done, how many in all."""


def run_stage(
    directory: SweepDirectory,
    runs: Sequence[PlannedRun],
    jobs: int,
    simulate: Sequence[str],
    on_progress: Progress,
) -> list[Row]:
    """Run those of `runs` not finished yet, `jobs` at a time; return every run's row.

    `simulate` is the command that starts `fedmodel simulate` (its arguments follow).
    A run that fails stops the sweep, naming its log; on any exit, runs still going are
    stopped and their directories removed (they restart from nothing on resume).
    """
    definition = directory.definition
    finished = {row["key"]: row for row in directory.rows()}
    todo = [run for run in runs if run.key(definition) not in finished]
    total, done = len(runs), len(runs) - len(todo)
    replies: queue.Queue[tuple[int, int]] = queue.Queue()
    slots = core_slots(jobs)
    free = list(reversed(range(len(slots))))
    running: dict[int, tuple[PlannedRun, str, float, int]] = {}  # slot: run, key, start, pid
    pending = list(reversed(todo))
    try:
        while pending or running:
            while pending and free:
                slot, run = free.pop(), pending.pop()
                key = run.key(definition)
                run_dir = directory.run_dir(key)
                shutil.rmtree(run_dir, ignore_errors=True)  # a run interrupted midway
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                _log(run_dir).unlink(missing_ok=True)
                environment = tool_environment() | {"OMP_NUM_THREADS": str(len(slots[slot]))}
                process = start_detached(
                    [*simulate, *run.arguments(definition, run_dir)],
                    _log(run_dir),
                    environment,
                    die_with_parent=True,
                )
                with contextlib.suppress(ProcessLookupError):  # before it starts its workers
                    os.sched_setaffinity(process.pid, slots[slot])
                running[slot] = (run, key, time.monotonic(), process.pid)
                threading.Thread(
                    target=lambda s=slot, p=process: replies.put((s, p.wait())), daemon=True
                ).start()
            slot, code = replies.get()
            run, key, started, _ = running.pop(slot)
            free.append(slot)
            summary = RunSummary.of_completed_run(directory.run_dir(key))
            if code != 0 or summary is None:
                log = _log(directory.run_dir(key))
                said = next((line for line in reversed(plain_lines(log.read_text())) if line), "")
                raise SimulationError(
                    f"sweep run {run.described()} at epsilon {run.epsilon:g}, seed {run.seed} "
                    f"failed (exit code {code}: {said}); its output is in {log}"
                )
            row = directory.row_of(run, key, summary, time.monotonic() - started)
            directory.append(row)
            finished[key] = row
            done += 1
            on_progress(run, row, done, total)
    finally:
        for _, key, _, pid in running.values():
            stop_group(pid, STOP_TIMEOUT_S)
            shutil.rmtree(directory.run_dir(key), ignore_errors=True)
    return [finished[run.key(definition)] for run in runs]


def _log(run_dir: Path) -> Path:
    """Where a run's own output goes: beside its run directory (which a restart clears)."""
    return run_dir.parent / f"{run_dir.name}.log"


def core_slots(jobs: int) -> list[set[int]]:
    """The cores each of `jobs` concurrent runs may use: this process's cores shared out
    (with more jobs than cores, each job gets one, shared round-robin)."""
    cores = sorted(os.sched_getaffinity(0))
    if jobs >= len(cores):
        return [{cores[index % len(cores)]} for index in range(jobs)]
    share = len(cores) // jobs
    return [set(cores[index * share : (index + 1) * share]) for index in range(jobs)]
