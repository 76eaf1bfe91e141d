"""`fedmodel sweep`: tune a scenario on a grid, then measure the chosen settings over seeds.

Stage 1 runs every grid configuration once per epsilon, scored on a validation split
carved from the clients' training rows (fedmodel/validation.py): the test set is never
read while choosing. For each epsilon and arm (federated, central DP, site alone) the
configuration with the best validation score is chosen (simulations/sweep_results.py):
the baselines are tuned on the same grid, the same way, so the comparison is fair.
Stage 2 reruns each chosen configuration with every seed, scored on the test set, and
the report (simulations/sweep_report.py) shows the mean and 95% t-interval per epsilon.
Runs, resumption and the CSV: simulations/sweep_runs.py; the plan: sweep_plan.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from simulations.sweep_plan import stage_one, stage_two
from simulations.sweep_report import write_sweep_report
from simulations.sweep_results import (
    SweepOutcome,
    arm_results,
    choose,
    constant_loss,
    validation_scores,
)
from simulations.sweep_runs import Progress, SweepDirectory, run_stage


def run_sweep(
    directory: SweepDirectory,
    jobs: int,
    simulate: Sequence[str],
    command: str,
    on_progress: Progress,
) -> SweepOutcome:
    """Both stages (skipping finished runs), then best.csv, the plot and sweep.md."""
    definition = directory.definition
    directory.open(command)
    first = run_stage(directory, stage_one(definition), jobs, simulate, on_progress)
    chosen = choose(validation_scores(first, definition))
    plan = stage_two(definition, {eps: list(picks.values()) for eps, picks in chosen.items()})
    second = run_stage(directory, plan, jobs, simulate, on_progress)
    results = arm_results([*first, *second], definition, chosen)
    metric = first[0]["metric"]
    outcome = SweepOutcome(results, metric, constant_loss(second))
    write_sweep_report(directory.path, definition, outcome, command)
    return outcome
