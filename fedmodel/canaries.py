"""Empirical privacy audit in one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

"Privacy Auditing with One (1) Training Run", arXiv 2305.08846: m canary records are
each included in the training data independently with probability 1/2 (from a secret
seed); after one training run, an auditor who sees only the final model (black box)
scores every canary by its loss, guesses IN for the k best-fitted and OUT for the k worst
and counts its correct guesses. Under (epsilon, delta)-DP the number correct is
dominated by a binomial with success probability e^eps / (1 + e^eps) plus a delta term;
the largest epsilon that this test rejects at confidence 1 - beta is a lower bound
epsilon_LB on the true privacy loss.

Reading the result: epsilon_LB is a statement about this attack, not a guarantee. It
is capped by the number of canaries (`ceiling`: perfect guessing), and black-box audits
of DP-SGD land far below the accountant's epsilon. The one useful alarm is the other
direction: epsilon_LB above the accountant's epsilon (or above an epsilon someone claims
for the run) means the accounting (or the training) is wrong. The threat model matches
sample-level DP: canaries are records of one client's dataset, and the audited job is
that client's DP-SGD training.

It trains (fedmodel.training), so it sits above training, outside fedmodel.privacy,
whose accountant training itself uses.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from fedmodel.config import RunConfig
from fedmodel.data import TabularData, make_loader
from fedmodel.models import ClassifierLoss, build_model
from fedmodel.privacy.accountant import epsilon_of
from fedmodel.privacy.calibration import calibrate_noise_multiplier
from fedmodel.sampling import poisson_plan
from fedmodel.training import train_dp, train_plain

CONFIDENCE_BETA = 0.05
CANARY_SCALE = 6.0  # canaries lie outside the standardised data cloud, where one record shows
AUDIT_MODEL = "wide-mlp"


@dataclass(frozen=True)
class EmpiricalAudit:
    """What one audit run measured, with everything needed to read the bound."""

    canaries: int
    included: int
    guesses: int
    correct: int
    beta: float
    delta: float
    epsilon_lower_bound: float
    ceiling: float
    dp: bool
    accountant_epsilon: float | None
    pld_epsilon: float | None
    noise_multiplier: float | None
    sample_rate: float
    steps: int
    threat_model: str = "black-box final model, loss scores, input-space canaries"
    # An epsilon reported for this run by someone else, tested instead of the accountant's.
    claimed_epsilon: float | None = None

    @property
    def tested_epsilon(self) -> float | None:
        """The epsilon the alarm holds the bound against: the claim, else the accountant's."""
        return self.accountant_epsilon if self.claimed_epsilon is None else self.claimed_epsilon

    @property
    def accounting_bug(self) -> bool:
        """The alarm: the attack proved more leakage than the tested epsilon admits."""
        tested = self.tested_epsilon
        return tested is not None and self.epsilon_lower_bound > tested

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "accounting_bug": self.accounting_bug}


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of `v` correct out of `r` guesses on `m` canaries under (epsilon, delta)-DP.

    Theorem 3.1 of Steinke et al. (2023), as in the paper's reference code:
    P[Bin(r, q) >= v] + 2 m delta max_i P[v - i <= Bin(r, q) < v] / i, q = e^eps/(1+e^eps).
    """
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v-1], P[Bin = v-2], ...
    slack = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * slack, 1.0)


def one_run_epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, beta: float = CONFIDENCE_BETA
) -> float:
    """Largest epsilon rejected at confidence 1 - beta: sup{eps : p(eps) < beta} (0 if none)."""
    if not 0 <= v <= r <= m:
        raise ValueError("need 0 <= correct <= guesses <= canaries")
    if one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, r, v, high, delta) < beta:
        low, high = high, high * 2
    for _ in range(40):
        middle = (low + high) / 2
        if one_run_p_value(m, r, v, middle, delta) < beta:
            low = middle
        else:
            high = middle
    return low


def make_canaries(num_features: int, count: int, rng: np.random.Generator) -> TabularData:
    """Out-of-distribution records with random labels: memorised only if included."""
    features = rng.normal(scale=CANARY_SCALE, size=(count, num_features)).astype(np.float32)
    labels = rng.integers(0, 2, size=count).astype(np.float32)
    return TabularData(features, labels, tuple(f"x{i}" for i in range(num_features)))


def run_empirical_audit(
    config: RunConfig,
    data: TabularData,
    canaries: int = 1000,
    guesses: int = 100,
    epochs: int = 20,
    seed: int | None = None,
    model_name: str = AUDIT_MODEL,
) -> EmpiricalAudit:
    """Train once on `data` plus the included canaries; score, guess and bound epsilon.

    `guesses` is k: IN for the k lowest-loss canaries and OUT for the k highest (fixed in
    advance, so no correction for choosing k is needed). `model_name` goes to `audit_model`:
    wide-mlp is no federated model, so not a `RunConfig.model`. `seed` is the secret that
    decides inclusion; None draws it from the OS's CSPRNG.
    """
    if not 0 < 2 * guesses <= canaries:
        raise ValueError("need 0 < 2 * guesses <= canaries")
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    canary_set = make_canaries(data.num_features, canaries, rng)
    included = rng.random(canaries) < 0.5
    training = TabularData(
        np.concatenate([data.features, canary_set.features[included]]).astype(np.float32),
        np.concatenate([data.labels, canary_set.labels[included]]).astype(np.float32),
        data.feature_names,
    )
    torch.manual_seed(int(rng.integers(2**31)))  # the model's initial weights
    model = audit_model(model_name, data.num_features)
    loader = make_loader(training.dataset(), config.batch_size, int(rng.integers(2**31)))
    loss = ClassifierLoss(reduction="none")
    plan = poisson_plan(len(training), config.batch_size)
    steps, sample_rate = epochs * plan.steps_per_epoch, plan.sample_rate
    device = torch.device("cpu")
    noise_multiplier = accountant_epsilon = pld = None
    if config.sample_dp:
        noise_multiplier = calibrate_noise_multiplier(
            config.epsilon, config.delta, sample_rate, steps
        )
        result = train_dp(
            model, loss, loader, epochs, config.lr, noise_multiplier, config.max_grad_norm, [],
            device, seed=int(rng.integers(2**63)),  # noise and batches: the audit's secret, too
        )  # fmt: skip
        accountant_epsilon = epsilon_of(result.history, config.delta)
        from fedmodel.privacy.audit_accounting import pld_epsilon

        pld = pld_epsilon(result.history, config.delta)
    else:
        train_plain(model, loss, loader, epochs, config.lr, device)

    scores = -_losses(model, canary_set)  # higher: fits better: guess IN
    order = np.argsort(scores)
    guessed_in, guessed_out = order[-guesses:], order[:guesses]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    r = 2 * guesses
    return EmpiricalAudit(
        canaries=canaries,
        included=int(included.sum()),
        guesses=r,
        correct=correct,
        beta=CONFIDENCE_BETA,
        delta=config.delta,
        epsilon_lower_bound=one_run_epsilon_lower_bound(canaries, r, correct, config.delta),
        ceiling=one_run_epsilon_lower_bound(canaries, r, r, config.delta),
        dp=config.sample_dp,
        accountant_epsilon=accountant_epsilon,
        pld_epsilon=pld,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
    )


def audit_model(name: str, num_features: int, width: int = 256) -> nn.Module:
    """A registry model, or (`wide-mlp`) one with room to memorise: a stronger attack.

    The audit tests the DP-SGD mechanism and its accounting, which hold for any model;
    a model that memorises easily makes the non-private control leak clearly, so the
    test has teeth (Steinke et al. use over-parameterised networks for the same reason).
    """
    if name != AUDIT_MODEL:
        return build_model(name, num_features)
    return nn.Sequential(
        nn.Linear(num_features, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 1),
    )


@torch.no_grad()
def _losses(model: nn.Module, data: TabularData) -> np.ndarray:
    model.eval()
    features, labels = data.tensors()
    logits = model(features).squeeze(-1)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return np.asarray(loss.numpy(), dtype=np.float64)
