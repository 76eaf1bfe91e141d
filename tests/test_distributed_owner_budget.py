"""A deployed owner's budget pays for distributed-DP rounds as it pays for DP-SGD rounds.

The coordinator chooses the cohort size that sets each node's noise share, and it is
the adversary distributed DP protects against: the owner's charge counts only the noise
shares its policy trusts, so neither a claimed cohort nor round after round can take
the owner past its budget.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from client.app import charge_distributed_round
from fedmodel.config import RunConfig
from fedmodel.distributed_secagg import distributed_parameters
from fedmodel.privacy.analysis import RDP_ORDERS
from fedmodel.privacy.audit import audit
from fedmodel.privacy.audit_accounting import ddg_owner_multiplier
from fedmodel.privacy.budget import BudgetExhausted
from fedmodel.privacy.distributed_accounting import DistributedRelease, owner_segment
from fedmodel.privacy.distributed_ledger import OWNER_RELEASE_KIND, owner_release_json
from fedmodel.privacy.ledger import NODE_BUDGET, PrivacyLedger
from fedmodel.protocol import NOISE_SHARES_KEY
from tests.conftest import deployed_node_context

DIMENSION = 1_000  # an update's length: padded to 1,024
DELTA = 1e-5


def _config(noise: float, clients: int) -> RunConfig:
    return RunConfig(
        dp="distributed", secagg=True, secagg_shares=3, secagg_threshold=2,
        distributed_noise=noise, clients=clients, min_clients=2,
    )  # fmt: skip


def test_the_charge_covers_the_release_at_every_order_and_counts_only_trusted_shares() -> None:
    parameters = distributed_parameters(_config(2.0, 10), DIMENSION)
    multipliers = []
    for shares in (1, 3, 10):
        multiplier, rate, steps = owner_segment(parameters, shares)
        assert (rate, steps) == (1.0, 1)
        # the audit's own implementation of the DDG bound, at a record-level shift
        allowed = ddg_owner_multiplier(DistributedRelease(1, parameters, shares), RDP_ORDERS)
        assert multiplier == pytest.approx(allowed, rel=1e-9)
        multipliers.append(multiplier)
    # at this noise the sum is all but a continuous Gaussian: K shares of variance
    # sigma^2 against a shift of twice the norm bound
    sigma, bound = parameters.integer_stddev, parameters.norm_bound
    for shares, multiplier in zip((1, 3, 10), multipliers, strict=True):
        assert multiplier == pytest.approx(math.sqrt(shares) * sigma / (2 * bound), rel=1e-6)
    assert multipliers == sorted(multipliers)  # the more shares trusted, the less charged


def test_a_coordinator_claiming_a_bigger_cohort_only_raises_what_the_owner_is_charged() -> None:
    """Each node adds sigma = z c / sqrt(n) for the n the run config names: a claimed
    cohort of 1,000 shrinks every node's share, and the owner, who counts its own 3
    shares, is charged more for the same --distributed-noise, never less."""
    honest = owner_segment(distributed_parameters(_config(2.0, 3), DIMENSION), 3)
    claimed = owner_segment(distributed_parameters(_config(2.0, 1_000), DIMENSION), 3)
    assert claimed[0] < honest[0] / 10
    spend = RDPAccountant()
    spend.history = [honest]
    inflated = RDPAccountant()
    inflated.history = [claimed]
    assert inflated.get_epsilon(DELTA) > 10 * spend.get_epsilon(DELTA)


def test_a_deployed_node_charges_each_round_and_refuses_the_one_its_budget_cannot_pay(
    tmp_path: Path,
) -> None:
    config = _config(4.0, 3)
    budget = 8.0
    context = deployed_node_context(tmp_path, config, budget)
    context.node_config[NOISE_SHARES_KEY] = 3
    parameters = distributed_parameters(config, DIMENSION)
    segment = owner_segment(parameters, 3)

    # Opacus's own accountant: how many such rounds fit in the budget
    def opacus_epsilon(rounds: int) -> float:
        accountant = RDPAccountant()
        accountant.history = [(segment[0], 1.0, rounds)]
        return float(accountant.get_epsilon(DELTA))

    fits = max(n for n in range(1, 200) if opacus_epsilon(n) <= budget)
    assert 2 <= fits < 199
    reported = [
        charge_distributed_round(config, context, parameters, r) for r in range(1, fits + 1)
    ]
    assert reported[-1] == pytest.approx(opacus_epsilon(fits), rel=1e-6)
    ledger = PrivacyLedger(Path(str(context.node_config["ledger-path"])))
    before = ledger.entries()
    with pytest.raises(BudgetExhausted):
        charge_distributed_round(config, context, parameters, fits + 1)
    assert ledger.entries() == before  # a refused round writes nothing

    assert len(before) == 2 * fits and {e.fingerprint for e in before} == {NODE_BUDGET}
    recorded = json.loads(before[-1].mechanism or "")
    assert recorded["kind"] == OWNER_RELEASE_KIND and recorded["noise_shares"] == 3
    report = audit(ledger.path)
    assert report.ok, report.all_problems()
    (owner,) = report.ledgers[0].owners
    assert owner.spent_epsilon == pytest.approx(opacus_epsilon(fits), rel=1e-6)


def test_an_under_charged_distributed_round_fails_the_audit(tmp_path: Path) -> None:
    """An edited node (or ledger writer) that charges its release at twice the noise it
    was allowed: the chain holds, the epsilons follow from the segments, and the audit
    still names the entry, from the release it records."""
    parameters = distributed_parameters(_config(2.0, 3), DIMENSION)
    release = DistributedRelease(1, parameters, 1)
    honest = owner_segment(parameters, 1)
    cheated = (2 * honest[0], 1.0, 1)
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.sqlite")
    pending, _ = ledger.write_ahead(
        NODE_BUDGET, "run", 1, cheated, parameters.clip_norm, DELTA, None,
        lambda spent: _opacus([*spent, cheated]), owner_release_json(release),
    )  # fmt: skip
    ledger.commit(pending, cheated, _opacus([cheated]))
    report = audit(ledger.path)
    assert not report.ok
    problems = report.all_problems()
    assert any("charges a distributed round as noise multiplier" in p for p in problems)
    assert all("#1" in p or "#2" in p for p in problems if "distributed round" in p)


def _opacus(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(DELTA))


def test_the_owner_sets_the_shares_it_trusts_and_a_bad_count_is_one_line(tmp_path: Path) -> None:
    def client(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "fedmodel.cli", "client", *args, "--dir", str(tmp_path)]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert client("init", "--budget-epsilon", "3").returncode == 0
    bad = client("policy", "--distributed-noise-shares", "0")
    assert bad.returncode == 2 and "--distributed-noise-shares" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    good = client("policy", "--accept-distributed-dp", "--distributed-noise-shares", "3")
    assert good.returncode == 0, good.stderr
    assert "distributed DP accepted, charged counting 3 noise shares" in good.stdout
