"""Distributed DP under SecAgg+ in simulation: options, the workflow's map inverted, the
release record and its audit, and a real 5-client run in which the coordinator sees only
masked vectors and still moves the model by the clients' clipped mean plus the noise."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    parameters_addition,
    parameters_mod,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from fedmodel.config import RunConfig
from fedmodel.console.privacy import PrivacyView
from fedmodel.console.runs import RunView
from fedmodel.distributed_secagg import (
    ROTATION_SEED_KEY,
    WORKFLOW_CLIPPING_RANGE,
    WORKFLOW_QUANTIZATION_RANGE,
    distributed_parameters,
    residues_from_workflow,
)
from fedmodel.errors import ConfigError
from fedmodel.model_file import read_model_file
from fedmodel.privacy.audit import audit, audit_ledger
from fedmodel.privacy.central import FEDERATION_LEDGER
from fedmodel.privacy.discrete_gaussian import discrete_gaussian_variance
from fedmodel.privacy.distributed_accounting import DistributedRelease, distributed_epsilon
from fedmodel.privacy.distributed_dp import (
    clip,
    encode,
    plan_granularity,
    rounding_error_bound,
)
from fedmodel.privacy.distributed_ledger import (
    DistributedBudgetStop,
    DistributedLedger,
    release_of,
)
from fedmodel.privacy.ledger import PrivacyLedger
from fedmodel.privacy.ledger_chain import COMMITTED, LedgerEntry
from fedmodel.protocol import PARTITION_ID_KEY, SERVER_ROUND_KEY
from fedmodel.run_directory import CLASSIFIER_SCORING, DISTRIBUTED_MECHANISM
from server.distributed_dp import distributed_dp_strategy
from server.resume import resume_config
from server.run_record import RunRecorder
from server.strategy import FederationStopped
from simulations.apps import ENCODING_DUMP_VARIABLE
from simulations.runner import client_app_reference


def test_dp_distributed_implies_secagg_with_fedmodels_own_client_mod() -> None:
    config = RunConfig(dp="distributed")
    assert config.secagg and config.distributed_dp and not config.sample_dp
    assert not config.client_dp
    assert RunConfig.from_run_config(config.to_run_config()) == config
    assert client_app_reference(config) == "simulations.apps:distributed_dp_client_app"


def test_a_distributed_dp_run_is_not_resumed(tmp_path: Path) -> None:
    """Nor is a SecAgg+ run's resume refused for being SecAgg+: only distributed DP's."""
    secagg = RunConfig(secagg=True, clients=3, secagg_shares=3, secagg_threshold=2)
    for config, name in ((RunConfig(dp="distributed"), "distributed"), (secagg, "secagg")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config.to_run_config()))
    with pytest.raises(ConfigError, match="a --dp distributed run cannot be resumed yet"):
        resume_config(tmp_path / "distributed")
    with pytest.raises(ConfigError, match="no resumable checkpoint"):
        resume_config(tmp_path / "secagg")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"aggregator": "median"}, "--dp distributed adds noise to a sum"),
        ({"byzantine": 1}, "no --byzantine"),
        ({"distributed_bits": 40}, "--distributed-bits must be between 2 and 32"),
        ({"distributed_noise": 0.0}, "--distributed-noise must be a positive number"),
        ({"distributed_clip": -1.0}, "--distributed-clip must be a positive number"),
        ({"distributed_epsilon": -1.0}, "--distributed-epsilon must be 0"),
    ],
)
def test_distributed_dp_settings_that_cannot_work_are_refused_in_one_line(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        RunConfig(dp="distributed", **changes)  # type: ignore[arg-type]
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "medical", "--dp", "distributed", "--aggregator", "krum"], "fedavg"),
        (["simulate", "medical", "--dp", "distributed", "--epsilon", "2"], "--dp distributed"),
        (["run", "--dir", "fed", "--dp", "distributed", "--byzantine", "1"], "no --byzantine"),
    ],
)
def test_the_cli_refuses_distributed_dp_mistakes_in_one_line(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedmodel.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.parametrize(("bits", "clients"), [(16, 3), (24, 100), (32, 1000)])
def test_the_workflows_dequantized_mean_gives_back_the_residue_sum(bits: int, clients: int) -> None:
    """Flower's own arithmetic, as SecAggPlusWorkflow applies it after unmasking, on
    residues each sent with weight factor 1; `residues_from_workflow` must invert it."""
    modulus = 1 << bits
    residues = np.random.default_rng(bits).integers(0, modulus, (clients, 257))
    summed = None
    for vector in residues:
        sent = [np.array([1]), vector]
        summed = sent if summed is None else parameters_addition(summed, sent)
    assert summed is not None
    total_factor, (recon,) = factor_extract(parameters_mod(summed, modulus))
    (unmasked,) = dequantize([recon], WORKFLOW_CLIPPING_RANGE, WORKFLOW_QUANTIZATION_RANGE)
    unmasked += -(clients - 1) * WORKFLOW_CLIPPING_RANGE
    unmasked *= WORKFLOW_QUANTIZATION_RANGE / total_factor
    expected = np.mod(residues.sum(axis=0), modulus)
    assert np.array_equal(residues_from_workflow(unmasked, clients, modulus), expected)


def _release(server_round: int, clients: int) -> DistributedRelease:
    return DistributedRelease(server_round, plan_granularity(1.0, 0.5, 18, 10, 100), clients)


def _releases(ledger_path: Path) -> list[DistributedRelease]:
    entries = PrivacyLedger.open_existing(ledger_path).entries()
    return [release_of(entry) for entry in entries if entry.status == COMMITTED]


def _rewrite(ledger_path: Path, entries: list[LedgerEntry]) -> None:
    """Store `entries` in place of the ledger's, as someone editing the SQLite file would."""
    with closing(sqlite3.connect(ledger_path)) as connection, connection:
        for entry in entries:
            columns = dataclasses.asdict(entry)
            assignments = ", ".join(f"{column} = :{column}" for column in columns)
            connection.execute(f"UPDATE entries SET {assignments} WHERE seq = :seq", columns)


def test_the_budget_stops_a_round_and_the_audit_catches_an_edited_or_rewritten_chain(
    tmp_path: Path,
) -> None:
    """Releases go into the federation ledger's hash chain: an edited entry breaks it, and
    a chain rewritten with fresh hashes (the simulation's ledger is unsigned) is still
    caught by the independent recompute of its epsilon."""
    ledger = DistributedLedger(tmp_path, "run", 1e-5, None)
    first = ledger.record(_release(1, 10))
    second = ledger.record(_release(2, 6))  # 4 dropped out: less noise, more epsilon
    full = DistributedLedger(tmp_path / "full", "run", 1e-5, None)
    full.record(_release(1, 10))
    assert second > 1.1 * full.record(_release(2, 10))
    limited = DistributedLedger(tmp_path / "limited", "run", 1e-5, (first + second) / 2)
    limited.record(_release(1, 10))
    with pytest.raises(DistributedBudgetStop, match="round 2 would take epsilon from"):
        limited.check(_release(2, 10))

    path = tmp_path / FEDERATION_LEDGER
    found = audit_ledger(path)
    assert found.ok and found.distributed is not None and found.distributed.releases == 2
    assert found.distributed.recomputed_epsilon == pytest.approx(second, rel=0.005)
    assert [r.clients for r in _releases(path)] == [10, 6]

    entries = PrivacyLedger.open_existing(path).entries()
    edited = dataclasses.replace(entries[3], epsilon=second / 2)  # round 2's commit, halved
    _rewrite(path, [edited])
    broken = audit_ledger(path)
    assert not broken.ok and broken.first_bad_entry == 4
    assert "entry #4 content does not match its SHA-256" in broken.problems[0]

    rehashed = dataclasses.replace(edited, entry_hash=edited.computed_hash())
    _rewrite(path, [rehashed])  # the last entry: nothing after it links to its hash
    rewritten = audit_ledger(path)
    assert rewritten.chain_ok and not rewritten.ok
    assert rewritten.distributed is not None
    assert "round 2: records epsilon" in rewritten.distributed.problems[0]


class _Node(ClientProxy):
    """A client the strategy can sample; it is never asked anything."""

    def get_properties(self, *args: object, **kwargs: object) -> Any:
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def test_strategy_applies_the_decoded_clipped_mean_and_stops_before_the_budget(
    tmp_path: Path,
) -> None:
    """Three clients' real encodings, summed and dequantized as SecAggPlusWorkflow does;
    the strategy must move the model by their clipped mean (within rounding and noise),
    record the release, and refuse round 2 once it would pass the budget."""
    dimension, clients = 6, 3
    config = RunConfig(dp="distributed", clients=clients, secagg_shares=3, secagg_threshold=2)
    mechanism = distributed_parameters(config.replace(distributed_noise=0.01), dimension)
    once = distributed_epsilon([DistributedRelease(1, mechanism, clients)], config.delta)
    both = [DistributedRelease(r, mechanism, clients) for r in (1, 2)]
    twice = distributed_epsilon(both, config.delta)
    config = config.replace(distributed_noise=0.01, distributed_epsilon=(once + twice) / 2)
    global_model = [np.arange(dimension, dtype=np.float32).reshape(2, 3) / 10]
    strategy = distributed_dp_strategy(
        config,
        RunRecorder(tmp_path, config, CLASSIFIER_SCORING),
        {"shares": 3},
        dimension,
        {
            "initial_parameters": ndarrays_to_parameters(global_model),
            "fraction_evaluate": 0.0,
            "on_fit_config_fn": lambda server_round: {SERVER_ROUND_KEY: server_round},
        },
    )
    assert strategy.mechanism == mechanism
    nodes = SimpleClientManager()
    for node in range(clients):
        nodes.register(_Node(str(node)))
    sent = strategy.configure_fit(1, ndarrays_to_parameters(global_model), nodes)
    rotation_seed = int(sent[0][1].config[ROTATION_SEED_KEY])

    updates = np.random.default_rng(1).normal(0, 0.6, (clients, dimension))  # some clipped
    generator = np.random.default_rng(2)
    residues = [encode(update, mechanism, rotation_seed, generator) for update in updates]
    summed = np.mod(np.sum(residues, axis=0), mechanism.modulus)
    unmasked = (2 * WORKFLOW_CLIPPING_RANGE * summed - clients * WORKFLOW_CLIPPING_RANGE) / clients
    results = []
    for partition in range(clients):
        reply: dict[str, Scalar] = {"num-examples": 50, PARTITION_ID_KEY: partition}
        fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([unmasked]), 1, reply)
        results.append((nodes.all()[str(partition)], fit))
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    assert parameters is not None and metrics["client_level_epsilon"] == pytest.approx(once)
    (moved,) = parameters_to_ndarrays(parameters)
    expected = global_model[0].ravel() + np.mean([clip(u, 1.0) for u in updates], axis=0)
    noise = 6 * mechanism.local_stddev * np.sqrt(clients * dimension) / clients
    bound = rounding_error_bound(mechanism, clients) / clients + noise
    error = float(np.linalg.norm(moved.ravel() - expected))
    print(f"decoded mean off by {error:.2e} (bound {bound:.2e})")
    assert error < bound < 0.1
    assert [r.clients for r in _releases(tmp_path / FEDERATION_LEDGER)] == [3]
    with pytest.raises(FederationStopped, match="round 2 would take epsilon"):
        strategy.configure_fit(2, parameters, nodes)


def _flat_checkpoint(run_dir: Path, server_round: int) -> np.ndarray:
    saved = torch.load(run_dir / "checkpoints" / f"round-{server_round:04d}.pt", weights_only=True)
    return np.concatenate([t.double().numpy().ravel() for t in saved["state_dict"].values()])


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """5 synthetic-ehr hospitals, 2 rounds, --dp distributed (noise 0.1, 18 bits), one
    client dropping out of each round after sharing its keys; returns (run directory,
    the surviving clients' dumps: test only)."""
    from tests.test_simulation import simulate

    tmp_path = tmp_path_factory.mktemp("distributed")
    dump = tmp_path / "encodings"
    started = time.monotonic()
    _, run_dir = simulate(
        tmp_path,
        *("--dataset", "synthetic-ehr", "--clients", "5", "--rounds", "2"),
        *("--model", "mlp", "--lr", "0.5"),  # 1,024 coordinates: the checks below need many
        *("--dp", "distributed", "--distributed-noise", "0.1", "--distributed-bits", "18"),
        *("--secagg-dropouts", "1", "--no-baselines", "--engine", "local"),
        env={**os.environ, ENCODING_DUMP_VARIABLE: str(dump)},
        command=[sys.executable, "-m", "fedmodel.cli"],  # this checkout's
    )
    print(f"distributed DP end-to-end: {time.monotonic() - started:.1f} s")
    return run_dir, dump


@pytest.mark.slow
def test_distributed_dp_run_shows_the_coordinator_only_masked_vectors_and_trains(
    distributed_run: tuple[Path, Path],
) -> None:
    """Each surviving client dumps (test only) its plaintext update, its residues and its
    masked vector, byte for byte what the coordinator receives. The masked vectors must not
    correlate with the residues; the model must move by the clients' clipped mean plus
    noise whose squared norm matches the summed discrete Gaussians' variance; the audit
    must recompute each release, accounted with the 4 survivors; and the model must train.
    """
    run_dir, dump = distributed_run
    releases = _releases(run_dir / FEDERATION_LEDGER)
    assert [r.clients for r in releases] == [4, 4]  # partition 4 dropped out
    mechanism = releases[0].parameters
    report = json.loads((run_dir / "secagg.json").read_text())
    assert [r["parameter_sets_received"] for r in report["rounds"]] == [1, 1]
    assert [r["survivors"] for r in report["rounds"]] == [4, 4]

    noise_norm_ratios = []
    seen_by_coordinator: list[np.ndarray] = []
    encoded: list[np.ndarray] = []
    for server_round in (1, 2):
        clients = [np.load(dump / f"round-{server_round}-client-{c}.npz") for c in range(4)]
        assert not (dump / f"round-{server_round}-client-4.npz").exists()
        masked = [c["masked"].astype(np.float64) for c in clients]
        residues = [c["residues"].astype(np.float64) for c in clients]
        seen_by_coordinator += masked
        encoded += residues
        for seen, own in zip(masked, residues, strict=True):  # 5 sigma at 1,024 coordinates
            assert abs(np.corrcoef(seen, own)[0, 1]) < 5 / np.sqrt(own.size)
            assert not np.array_equal(seen, own)
        clipped_mean = np.mean([clip(c["update"], mechanism.clip_norm) for c in clients], axis=0)
        moved = _flat_checkpoint(run_dir, server_round) - _flat_checkpoint(
            run_dir, server_round - 1
        )
        error = moved - clipped_mean
        # the mean's noise: 4 survivors' discrete Gaussians, gamma-sized steps, over 4
        variance = 4 * discrete_gaussian_variance(mechanism.integer_stddev) / 16
        expected = mechanism.dimension * variance * mechanism.granularity**2
        noise_norm_ratios.append(float(error @ error) / expected)
    pooled = np.corrcoef(np.concatenate(seen_by_coordinator), np.concatenate(encoded))[0, 1]
    print(f"masked vectors against the residues, pooled correlation {pooled:.4f}")
    assert abs(pooled) < 0.05  # 8,192 pairs: 4.5 standard errors
    print(f"squared error over the noise's expectation: {noise_norm_ratios}")
    assert all(0.8 < ratio < 1.25 for ratio in noise_norm_ratios)  # about 4 sigma each

    audited = audit(run_dir)
    assert audited.ok and audited.distributed is not None
    assert audited.distributed.releases == 2
    recorded = audited.distributed.recorded_epsilon
    assert audited.distributed.recomputed_epsilon == pytest.approx(recorded, rel=0.005)
    print(
        f"epsilon {recorded:.4f} recorded, {audited.distributed.recomputed_epsilon:.4f} recomputed"
    )

    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"AUROC {summary['initial']['auroc']:.3f} -> {summary['final']['auroc']:.3f}")
    assert summary["completed"] and summary["rounds"] == 2
    assert summary["final"]["auroc"] > summary["initial"]["auroc"] + 0.2


@pytest.mark.slow
def test_the_distributed_epsilon_shows_everywhere_and_a_truncated_ledger_fails_the_audit(
    distributed_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """summary.json's client-level block, report.md, report.html, the model file and the
    console's privacy view show the distributed epsilon (the ledger's); a ledger cut back
    to round 1 keeps an intact chain, and the audit catches it against summary.json."""
    run_dir, _ = distributed_run
    started = time.monotonic()
    epsilon = PrivacyLedger.open_existing(run_dir / FEDERATION_LEDGER).entries()[-1].epsilon
    block = json.loads((run_dir / "summary.json").read_text())["client_level_dp"]
    assert block["mechanism"] == DISTRIBUTED_MECHANISM
    assert block["epsilon"] == epsilon and block["ledger"] == FEDERATION_LEDGER
    assert [(r["round"], r["survivors"]) for r in block["releases"]] == [(1, 4), (2, 4)]
    mechanism = _releases(run_dir / FEDERATION_LEDGER)[0].parameters
    sum_noise = 2 * mechanism.local_stddev / mechanism.clip_norm  # sqrt(4 survivors) sigma / c
    assert block["releases"][0]["noise_multiplier"] == pytest.approx(sum_noise)
    report = (run_dir / "report.md").read_text()
    assert f"epsilon {epsilon:.3f} at delta" in report and "from the coordinator too" in report
    assert f"| 2 | {sum_noise:.4f} |" in report and report.count(f"| {epsilon:.3f} | 4 |") == 1
    page = (run_dir / "report.html").read_text()
    assert "Distributed discrete Gaussian under SecAgg+" in page and f"{epsilon:.3f}" in page
    metadata, _ = read_model_file(run_dir / "model")
    assert metadata.privacy["client_level_epsilon"] == epsilon
    assert metadata.privacy["client_level_mechanism"] == DISTRIBUTED_MECHANISM
    view = PrivacyView.of_run(RunView.read(run_dir.name, run_dir))
    [row] = [row for row in view.owners if DISTRIBUTED_MECHANISM in row.owner]
    assert view.ok and row.federation_ledger and row.rounds == 2
    assert row.spent == pytest.approx(epsilon, rel=0.005)

    tampered = tmp_path / "truncated"
    shutil.copytree(run_dir, tampered)
    with closing(sqlite3.connect(tampered / FEDERATION_LEDGER)) as connection, connection:
        connection.execute("DELETE FROM entries WHERE server_round = 2")
    truncated = audit(tampered)
    assert all(ledger.chain_ok for ledger in truncated.ledgers) and not truncated.ok
    assert "summary.json records (entries removed or ledger replaced)" in truncated.problems[0]
    print(f"epsilon shown and truncation caught: {time.monotonic() - started:.1f} s")
