"""Client-level (central) DP: the accountant against dp-accounting, wrappers on real Messages."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, Grid, PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore.differential_privacy import compute_adaptive_noise_params
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod
from flwr.supercore.task_identity import TaskIdentity

from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError
from fedmodel.privacy.accountant import epsilon_of
from fedmodel.privacy.audit import audit
from fedmodel.privacy.central import (
    CLIENT_LEVEL_FINGERPRINT,
    CentralBudgetStop,
    CentralRelease,
    FederationLedger,
    effective_noise_multiplier,
    update_noise_multiplier,
)
from fedmodel.privacy.ledger import PrivacyLedger
from fedmodel.privacy.ledger_chain import COMMITTED, PENDING, verify_chain
from fedmodel.protocol import PARTITION_ID_KEY
from fedmodel.run_directory import CLASSIFIER_SCORING
from server.central_dp import with_central_dp
from server.checkpoint import restore_rng, rng_state
from server.run_record import RunRecorder
from server.strategy import FederationStopped, GuardedStrategy
from tests.conftest import dp_accounting_epsilon

DELTA = 1e-5
DIMENSIONS = 20_000  # enough coordinates to measure the noise's standard deviation to ~1%


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower refuses to build Messages outside a running app without an identity."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


class NodesGrid:
    """The one thing FedAvg's sampling asks a Grid for: which nodes are connected."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(10, 10 + nodes))

    def get_node_ids(self) -> Iterable[int]:
        return self.nodes


def replies(global_model: np.ndarray, updates: list[np.ndarray]) -> list[Message]:
    out = []
    for node, update in enumerate(updates, start=10):
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        weights = torch.tensor(global_model + update, dtype=torch.float64)
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": weights}),
                "metrics": MetricRecord(
                    {"num-examples": 100 * node, "train-loss": 0.5, PARTITION_ID_KEY: node - 10}
                ),
            }
        )
        out.append(Message(content=content, reply_to=instruction))
    return out


def central_strategy(tmp_path: Path, clients: int, **settings: object) -> Strategy:
    config = RunConfig(clients=clients, dp="client", output_dir=str(tmp_path), **settings)  # type: ignore[arg-type]
    recorder = RunRecorder(tmp_path, config, CLASSIFIER_SCORING)
    inner = FedAvg(min_train_nodes=clients, min_available_nodes=clients, fraction_evaluate=0.0)
    return with_central_dp(inner, config, recorder)


def one_round(
    strategy: Strategy, server_round: int, global_model: np.ndarray, updates: list[np.ndarray]
) -> np.ndarray:
    arrays = ArrayRecord({"w": torch.tensor(global_model, dtype=torch.float64)})
    list(strategy.configure_train(server_round, arrays, ConfigRecord(), cast(Grid, NodesGrid(3))))
    aggregated, _ = strategy.aggregate_train(server_round, replies(global_model, updates))
    assert aggregated is not None
    return cast(np.ndarray, aggregated["w"].numpy())


def test_effective_noise_is_andrew_et_al_theorem_1_as_flower_computes_it() -> None:
    for effective, count_stddev in [(0.5, 0.4), (1.0, 1.0), (2.0, 5.0)]:
        flower_count, flower_update = compute_adaptive_noise_params(effective, 8, count_stddev)
        assert flower_count == count_stddev
        assert update_noise_multiplier(effective, count_stddev) == pytest.approx(flower_update)
        assert effective_noise_multiplier(flower_update, count_stddev) == pytest.approx(effective)
    assert effective_noise_multiplier(1.3, 0.0) == 1.3  # fixed clipping: no count released
    with pytest.raises(ValueError, match="stddev above 0.5"):
        update_noise_multiplier(1.0, 0.5)


def test_client_level_epsilon_matches_dp_accounting(tmp_path: Path) -> None:
    """20 releases at q = 2/8: our live RDP number, dp-accounting's RDP and PLD."""
    ledger = FederationLedger(tmp_path, "run-1", DELTA, budget=None)
    for server_round in range(1, 21):
        release = CentralRelease(server_round, 1.1, 0.0, 0.7, 2 / 8)
        ledger.check(release)
        epsilon = ledger.record(release)
    history = [(1.1, 0.25, 20)]
    assert epsilon == pytest.approx(dp_accounting_epsilon(history, DELTA), rel=0.01)
    assert epsilon >= dp_accounting_epsilon(history, DELTA, pld=True)
    entries = ledger.ledger.entries()
    assert verify_chain(entries) is None
    assert [e.status for e in entries[:2]] == [PENDING, COMMITTED]
    assert {e.fingerprint for e in entries} == {CLIENT_LEVEL_FINGERPRINT}
    assert entries[-1].max_grad_norm == 0.7 and entries[-1].sample_rate == 0.25


def test_budget_stop_refuses_the_round_that_would_exceed_it(tmp_path: Path) -> None:
    ledger = FederationLedger(tmp_path, "run-1", DELTA, budget=8.0)
    committed = 0
    with pytest.raises(CentralBudgetStop, match="round 3 would take epsilon from 7.07"):
        for server_round in range(1, 10):
            release = CentralRelease(server_round, 1.0, 0.0, 1.0, 1.0)
            ledger.check(release)
            ledger.record(release)
            committed += 1
    # one unsubsampled Gaussian with sigma 1 per round: 7.08 after two rounds, 9.01 after three
    assert committed == 2
    assert dp_accounting_epsilon([(1.0, 1.0, 2)], DELTA) <= 8.0 * 1.01
    assert dp_accounting_epsilon([(1.0, 1.0, 3)], DELTA, pld=True) > 8.0
    assert ledger.spent_epsilon() <= 8.0
    assert len(ledger.ledger.entries()) == 4  # the refused round wrote nothing
    with pytest.raises(CentralBudgetStop):  # nor can it be written past the check
        ledger.record(CentralRelease(3, 1.0, 0.0, 1.0, 1.0))


def test_fixed_clipping_clips_noises_the_cohort_mean_and_records(tmp_path: Path) -> None:
    strategy = central_strategy(tmp_path, 3, central_noise=2.0, central_clipping_norm=1.0)
    global_model = np.zeros(DIMENSIONS)
    big = np.zeros(DIMENSIONS)
    big[0] = 50.0  # clipped to norm 1
    small = np.zeros(DIMENSIONS)
    small[1] = 0.3  # left alone
    result = one_round(strategy, 1, global_model, [big, small])  # the third client dropped out
    # (1 + 0.3) / 3, not a mean over the 2 replies nor weighted by their example counts
    noise = result.copy()
    noise[:2] -= [1 / 3, 0.3 / 3]
    assert np.std(noise) == pytest.approx(2.0 * 1.0 / 3, rel=0.02)
    assert abs(result[0] - 1 / 3) < 4 * 2.0 / 3
    [release] = strategy_recorder(strategy).central_releases
    assert release["clipping_norm"] == 1.0 and release["noise_multiplier"] == 2.0
    assert release["epsilon"] == pytest.approx(epsilon_of([(2.0, 1.0, 1)], DELTA))


def strategy_recorder(strategy: object) -> RunRecorder:
    return cast(RunRecorder, strategy.accounting.recorder)  # type: ignore[attr-defined]


def test_adaptive_clipping_noise_follows_the_norm_it_clipped_to(tmp_path: Path) -> None:
    """Andrew et al.: round t's norm clips and scales round t's noise; the norm rises while
    most updates are clipped (Flower 1.39's wrapper would lower it)."""
    strategy = central_strategy(
        tmp_path,
        3,
        central_noise=0.5,
        central_adaptive=True,
        central_clipping_norm=0.1,
        central_count_stddev=0.3,
        central_clip_lr=0.5,
    )
    global_model = np.zeros(DIMENSIONS)
    updates = [np.full(DIMENSIONS, 10.0 / math.sqrt(DIMENSIONS)) for _ in range(3)]  # norm 10
    update_noise = update_noise_multiplier(0.5, 0.3)
    norms = []
    for server_round in (1, 2, 3):
        norm = strategy.clipping_norm  # type: ignore[attr-defined]
        norms.append(norm)
        result = one_round(strategy, server_round, global_model, updates)
        clipped_mean = norm / math.sqrt(DIMENSIONS)  # each coordinate of the clipped update
        assert np.std(result - clipped_mean) == pytest.approx(update_noise * norm / 3, rel=0.02)
    assert norms[0] < norms[1] < norms[2]
    releases = strategy_recorder(strategy).central_releases
    assert [r["clipping_norm"] for r in releases] == norms
    assert releases[-1]["effective_noise_multiplier"] == pytest.approx(0.5)
    assert releases[-1]["epsilon"] == pytest.approx(epsilon_of([(0.5, 1.0, 3)], DELTA))


@pytest.mark.parametrize(
    "settings",
    [
        {"central_noise": 2.0},
        {"central_noise": 0.5, "central_adaptive": True, "central_count_stddev": 0.3},
    ],
    ids=["fixed", "adaptive"],
)
def test_the_same_release_from_the_same_checkpointed_generators_draws_fresh_noise(
    tmp_path: Path, settings: dict[str, object]
) -> None:
    """What a resumed round does: the global generators set back to a checkpoint's state,
    then the same clipped mean released again. Its noise (and the noisy count that moves
    the adaptive norm) must not repeat."""
    global_model = np.zeros(DIMENSIONS)
    updates = [np.full(DIMENSIONS, 0.3 / math.sqrt(DIMENSIONS))] * 3  # norm 0.3, not clipped
    checkpointed = rng_state()
    noise, norms = [], []
    for attempt in ("original", "resumed"):
        restore_rng(checkpointed)
        strategy = central_strategy(tmp_path / attempt, 3, central_clipping_norm=1.0, **settings)
        noise.append(one_round(strategy, 1, global_model, updates) - updates[0])
        norms.append(strategy.clipping_norm)  # type: ignore[attr-defined]
    release = strategy_recorder(strategy).central_releases[0]
    stddev = release["noise_multiplier"] * 1.0 / 3  # z_update * C / n
    for drawn in noise:
        assert np.std(drawn) == pytest.approx(stddev, rel=0.02)
    assert np.std(noise[0] - noise[1]) == pytest.approx(math.sqrt(2) * stddev, rel=0.02)
    assert not np.any(noise[0] == noise[1])
    if settings.get("central_adaptive"):
        assert norms[0] != norms[1]


def test_central_budget_stop_ends_the_federation_cleanly(tmp_path: Path) -> None:
    strategy = central_strategy(tmp_path, 3, central_noise=1.0, central_epsilon=8.0)
    model = np.zeros(10)
    one_round(strategy, 1, model, [np.ones(10)] * 3)
    one_round(strategy, 2, model, [np.ones(10)] * 3)
    with pytest.raises(FederationStopped, match="client-level DP budget: round 3"):
        one_round(strategy, 3, model, [np.ones(10)] * 3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dp": "central"}, "--dp must be one of off, sample, client, both"),
        ({"dp": "client", "aggregator": "median"}, "--dp client needs --aggregator fedavg"),
        ({"dp": "both", "central_noise": 0.0}, "--central-noise must be a positive number"),
        ({"dp": "client", "central_clipping_norm": -1.0}, "--central-clipping-norm must be"),
        ({"dp": "client", "central_epsilon": math.inf}, "--central-epsilon must be 0"),
        (
            {"dp": "client", "central_adaptive": True, "central_noise": 1.0},
            "below twice the clipped-count noise 0.4; raise --central-count-stddev",
        ),
        (
            {"dp": "client", "central_adaptive": True, "central_target_quantile": 1.0},
            "--central-target-quantile must be in",
        ),
    ],
)
def test_invalid_dp_settings_name_the_option(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig(**settings)  # type: ignore[arg-type]


def test_dp_mode_round_trips_through_the_run_config() -> None:
    config = RunConfig(dp="both", central_adaptive=True, central_count_stddev=2.0)
    back = RunConfig.from_run_config(config.to_run_config())
    assert back == config and back.sample_dp and back.client_dp
    assert not RunConfig(dp="client").sample_dp and not RunConfig(dp="sample").client_dp
    assert not RunConfig(dp="off").sample_dp and not RunConfig(dp="off").client_dp


def test_fixed_clipping_epsilon_equals_flowers_own_accountant(tmp_path: Path) -> None:
    """Every client every round (q = 1) is Flower's no-amplification setting, where its
    fixed-clipping accountant applies: the same number after 5 releases."""
    flower = RdpAccountant(
        PrivacyConfig(
            target_delta=DELTA,
            population_size=8,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    ledger = FederationLedger(tmp_path, "run-1", DELTA, budget=None)
    for server_round in range(1, 6):
        flower.compose(GaussianPrivacyEvent(noise_multiplier=2.0, sample_size=8, population_size=8))
        ours = ledger.record(CentralRelease(server_round, 2.0, 0.0, 1.0, 1.0))
    assert ours == pytest.approx(flower.get_privacy_spent().epsilon, rel=0.01)


def test_no_dp_is_dp_off_and_conflicts_with_another_mode(tmp_path: Path) -> None:
    fedmodel = str(Path(sys.executable).parent / "fedmodel")
    result = subprocess.run(
        [fedmodel, "simulate", "medical", "--no-dp", "--dp", "client", "--output", "run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == "error: --no-dp means --dp off; drop one of --no-dp and --dp client\n"
    assert not (tmp_path / "run").exists()


def test_inside_the_guard_the_dp_wrapper_sees_only_valid_replies(tmp_path: Path) -> None:
    """A NaN update is rejected and an error reply dropped before clipping and noise;
    Flower's wrapper would skip the whole round if it saw the error."""
    config = RunConfig(clients=3, dp="client", central_noise=1.0, output_dir=str(tmp_path))
    recorder = RunRecorder(tmp_path, config, CLASSIFIER_SCORING)
    inner = FedAvg(min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0)
    guarded = GuardedStrategy(with_central_dp(inner, config, recorder), recorder)
    global_model = np.zeros(DIMENSIONS)
    arrays = ArrayRecord({"w": torch.tensor(global_model, dtype=torch.float64)})
    list(guarded.configure_train(1, arrays, ConfigRecord(), cast(Grid, NodesGrid(3))))
    update = np.zeros(DIMENSIONS)
    update[0] = 3.0  # clipped to 1
    poisoned = np.full(DIMENSIONS, np.nan)
    valid, nan, _ = replies(global_model, [update, poisoned, update])
    failed = Message(Error(code=0, reason="node crashed"), reply_to=nan)
    aggregated, _ = guarded.aggregate_train(1, [valid, nan, failed])
    assert aggregated is not None
    result = aggregated["w"].numpy()
    assert np.std(result[1:]) == pytest.approx(1.0 / 3, rel=0.02)  # z * C / n, n = 3
    assert [r["round"] for r in recorder.central_releases] == [1]
    assert len(recorder.rejections) == 1 and "NaN" in recorder.rejections[0]["reason"]


def test_ledger_carries_the_noise_used_and_audit_checks_it_against_the_accounted(
    tmp_path: Path,
) -> None:
    ledger = FederationLedger(tmp_path, "run-1", DELTA, budget=None)
    ledger.record(CentralRelease(1, update_noise_multiplier(0.8, 1.0), 1.0, 0.5, 1.0))
    entry = ledger.ledger.entries()[-1]
    assert entry.noise_multiplier == pytest.approx(0.8)  # accounted: the effective one
    assert json.loads(entry.mechanism or "") == {
        "noise_multiplier": update_noise_multiplier(0.8, 1.0),
        "clipped_count_stddev": 1.0,
        "clipping_norm": 0.5,
    }
    assert audit(tmp_path).ok
    # A consistent chain whose accounted noise does not follow from the noise it used:
    mismatched = json.dumps(
        {"noise_multiplier": 0.8, "clipped_count_stddev": 1.0, "clipping_norm": 0.5}
    )
    ledger.ledger.write_ahead(
        CLIENT_LEVEL_FINGERPRINT, "run-1", 2, (0.8, 1.0, 1), 0.5, DELTA, None,
        lambda spent: epsilon_of([*spent, (0.8, 1.0, 1)], DELTA), mismatched,
    )  # fmt: skip
    report = audit(tmp_path)
    assert not report.ok
    assert any("entry #3 accounts noise multiplier 0.8" in p for p in report.all_problems())


def test_a_ledger_from_before_the_mechanism_column_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "client-0.sqlite"
    old = PrivacyLedger(path)
    pending, _ = old.write_ahead(
        "f" * 64, "run", 1, (1.0, 0.1, 10), 1.0, DELTA, None, lambda _: 1.0
    )
    old.commit(pending, (1.0, 0.1, 10), 1.0)
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("ALTER TABLE entries DROP COLUMN mechanism")
        connection.commit()
    entries = PrivacyLedger.open_existing(path).entries()
    assert verify_chain(entries) is None and entries[0].mechanism is None
    PrivacyLedger(path)  # a writer adds the column back; the chain still holds
    assert verify_chain(PrivacyLedger(path).entries()) is None
