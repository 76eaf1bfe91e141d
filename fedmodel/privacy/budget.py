"""Owner-side budget enforcement: a client refuses a round that would overspend its data.

The check runs on the data owner's machine, against the owner's ledger, before any
gradient is computed: epsilon is projected for everything already spent on this dataset
(every run, every round, crashed rounds included) plus the round's planned mechanism
(noise multiplier, sample rate, steps). Whatever the coordinator asks for - more local
epochs, a smaller batch (higher sample rate), less noise - changes the planned mechanism,
and so the projection; it cannot make the client spend past the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmodel.errors import ExitCode, FedModelError
from fedmodel.privacy.accountant import Segment, epsilon_of

BUDGET_EXHAUSTED = "budget-exhausted"
# Flower's own error codes are 0-8 (flwr.common.constant.ErrorCode); ours stays clear.
BUDGET_EXHAUSTED_CODE = 4001


class BudgetExhausted(FedModelError):
    """The next round would take this dataset's epsilon past its owner's budget."""

    exit_code = ExitCode.BUDGET_EXHAUSTED

    def __init__(self, spent: float, projected: float, budget: float, delta: float) -> None:
        self.spent, self.projected, self.budget, self.delta = spent, projected, budget, delta
        super().__init__(
            f"{BUDGET_EXHAUSTED}: this round would take epsilon from {spent:.4f} to "
            f"{projected:.4f} at delta {delta:g}, over the owner's budget {budget:g}"
        )


@dataclass(frozen=True)
class OwnerBudget:
    """The owner's (epsilon, delta) limit for one dataset, over all its runs; None = none."""

    epsilon: float | None
    delta: float

    def projector(self, planned: Segment) -> ProjectRound:
        return ProjectRound(self, planned)


@dataclass(frozen=True)
class ProjectRound:
    """Epsilon after `planned` on top of a spent history, refusing past the budget."""

    budget: OwnerBudget
    planned: Segment

    def __call__(self, spent: list[Segment]) -> float:
        projected = epsilon_of([*spent, self.planned], self.budget.delta)
        limit = self.budget.epsilon
        if limit is not None and projected > limit:
            raise BudgetExhausted(
                epsilon_of(spent, self.budget.delta), projected, limit, self.budget.delta
            )
        return projected


def new_segments(before: list[Segment], after: list[Segment]) -> list[Segment]:
    """What a training job added to the accountant's history (`after` extends `before`).

    Opacus appends (or, merged, extends) segments; the difference is exactly the
    mechanism the job ran, which is what the ledger commits.
    """
    added: list[Segment] = []
    for index, segment in enumerate(after):
        if index < len(before) - 1:
            if segment != before[index]:
                raise ValueError("the accountant's history was rewritten, not extended")
        elif index == len(before) - 1:
            noise, rate, steps = before[index]
            if segment[:2] != (noise, rate) or segment[2] < steps:
                raise ValueError("the accountant's history was rewritten, not extended")
            if segment[2] > steps:
                added.append((noise, rate, segment[2] - steps))
        else:
            added.append(segment)
    return added
