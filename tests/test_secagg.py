"""Secure aggregation (SecAgg+): settings, Flower's quantization, the strategy's view, and a
real 10-client simulation in which 2 clients drop out mid-protocol."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError
from fedmodel.protocol import PARTITION_ID_KEY
from fedmodel.run_directory import CLASSIFIER_SCORING
from fedmodel.runtime.flower_app import write_flower_app
from fedmodel.secagg import (
    CLIPPING_RANGE,
    MODULUS_RANGE,
    QUANTIZATION_RANGE,
    legacy_metrics,
    metrics_from_legacy,
    quantization_error_bound,
)
from server.run_record import RunRecorder
from server.secagg import REPORT_FILE, SecAggNodes, SecureFedAvg
from server.strategy import FederationStopped, Members
from simulations.apps import UPDATE_DUMP_VARIABLE
from simulations.runner import SIMULATION_SERVER_APP, client_app_reference


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"secagg_shares": 4}, "--secagg-shares must be odd"),
        ({"secagg_shares": 9}, "at most the 8 clients per round"),
        ({"secagg_threshold": 5}, "--secagg-threshold must be below --secagg-shares"),
        ({"secagg_threshold": 2}, "and above half of it"),
        ({"secagg_dropouts": 3}, "between 0 and shares - threshold = 2"),
        ({"aggregator": "median"}, "works only with --aggregator fedavg"),
        ({"max_update_norm": 5.0}, "no --max-update-norm"),
        ({"attack": "nan", "attackers": 0.25}, "no --attack"),
        ({"dp": "client"}, "use --dp sample or --dp distributed with --secagg"),
        ({"dp": "both"}, "use --dp sample or --dp distributed with --secagg"),
        ({"byzantine": 1}, "which --byzantine needs"),
        ({"clients": 2000}, "at most 1023 clients per round"),
    ],
)
def test_secagg_settings_that_cannot_work_are_refused_in_one_line(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        RunConfig(secagg=True, **changes)  # type: ignore[arg-type]


def test_default_secagg_settings_survive_two_dropouts_per_neighbourhood() -> None:
    config = RunConfig(secagg=True, clients=10, secagg_dropouts=2)
    assert (config.secagg_shares, config.secagg_threshold) == (5, 3)
    assert config.secagg_shares - config.secagg_threshold == 2


def test_privacy_history_survives_the_scalar_only_legacy_metrics() -> None:
    metrics = {
        "num-examples": 40,
        "epsilon": 0.7,
        "history-noise-multiplier": [1.1, 1.2],
        "history-steps": [3, 4],
    }
    encoded = legacy_metrics(metrics)
    assert all(isinstance(value, int | float | str) for value in encoded.values())
    assert metrics_from_legacy(encoded) == metrics


def _flower_secure_mean(models: list[list[np.ndarray]], weights: list[int], max_weight: float):
    """Flower's SecAgg+ arithmetic, client and server side, with real random masks."""
    masked, masks = None, []
    for index, (model, weight) in enumerate(zip(models, weights, strict=True)):
        q_ratio = round(weight / max_weight * QUANTIZATION_RANGE)
        scaled = parameters_multiply(model, q_ratio / QUANTIZATION_RANGE)
        vector = factor_combine(q_ratio, quantize(scaled, CLIPPING_RANGE, QUANTIZATION_RANGE))
        mask = pseudo_rand_gen(bytes([index]) * 32, MODULUS_RANGE, [a.shape for a in vector])
        masks.append(mask)
        vector = parameters_mod(parameters_addition(vector, mask), MODULUS_RANGE)
        masked = vector if masked is None else parameters_addition(masked, vector)
    assert masked is not None
    for mask in masks:
        masked = parameters_subtraction(masked, mask)
    q_total, summed = factor_extract(parameters_mod(masked, MODULUS_RANGE))
    mean = dequantize(summed, CLIPPING_RANGE, QUANTIZATION_RANGE)
    offset = -(len(models) - 1) * CLIPPING_RANGE
    return [(array + offset) * (QUANTIZATION_RANGE / q_total) for array in mean]


def test_quantization_bound_holds_for_flowers_own_arithmetic() -> None:
    rng = np.random.default_rng(7)
    weights = [int(n) for n in rng.integers(20, 600, size=8)]
    models = [[rng.normal(0, 1.5, size=(31,)).astype(np.float32)] for _ in weights]
    secure = _flower_secure_mean(models, weights, max_weight=max(weights))
    exact = sum(w * m[0].astype(np.float64) for w, m in zip(weights, models, strict=True))
    exact = exact / sum(weights)
    largest = max(float(np.abs(m[0]).max()) for m in models)
    bound = quantization_error_bound(weights, max(weights), largest)
    error = float(np.abs(secure[0] - exact).max())
    assert 0 < error <= bound
    assert bound < 1e-5  # tight enough to tell the mean from any one client's model


def _fit_result(partition: int, arrays: list[np.ndarray]) -> FitRes:
    metrics = {
        "num-examples": 50,
        PARTITION_ID_KEY: partition,
        "train-loss": 0.5,
        "epsilon": 0.3,
        "delta": 1e-5,
        "history-noise-multiplier": [1.5],
        "history-sample-rate": [0.25],
        "history-steps": [4],
    }
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 50, legacy_metrics(metrics))


def _proxy(node: int) -> GridClientProxy:
    """The proxy of node `node` as Flower's legacy workflow hands it to the strategy."""
    return GridClientProxy(node, None, 0)  # type: ignore[arg-type]  # no grid: never called


def _strategy(tmp_path: Path) -> SecureFedAvg:
    recorder = RunRecorder(
        tmp_path,
        RunConfig(secagg=True, clients=3, secagg_shares=3, secagg_threshold=2),
        CLASSIFIER_SCORING,
    )
    return SecureFedAvg(recorder, {"shares": 3}, min_clients=1)


def test_strategy_gets_one_unmasked_mean_and_records_each_clients_epsilon(tmp_path: Path) -> None:
    mean = ndarrays_to_parameters([np.full(4, 0.25, dtype=np.float32)])
    results = []
    for partition in range(3):
        fit = _fit_result(partition, [np.zeros(4, dtype=np.float32)])
        fit.parameters = mean  # what SecAggPlusWorkflow hands over for every survivor
        results.append((_proxy(partition), fit))
    strategy = _strategy(tmp_path)
    parameters, metrics = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    assert isinstance(parameters, Parameters) and parameters.tensors == mean.tensors
    assert metrics == {"clients": 3}
    assert [c["epsilon"] for c in strategy.recorder.clients.values()] == [0.3, 0.3, 0.3]
    assert strategy.recorder.clients["0"]["history"] == [[1.5, 0.25, 4]]
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    assert report["rounds"][0]["parameter_sets_received"] == 1


def test_deployed_strategy_names_clients_by_registry_and_records_the_nodes_scores(
    tmp_path: Path,
) -> None:
    """On a deployed run a reply's client is its authenticated node's, never the number it
    claims; the scores of the previous model riding on it are recorded, capped."""
    members = Members(clients={11: "0", 12: "1"}, weight_caps={11: 1, 12: 1})
    strategy = _strategy(tmp_path)
    strategy.nodes = SecAggNodes(members, ConfigRecord({}))
    mean = ndarrays_to_parameters([np.full(4, 0.25, dtype=np.float32)])
    scores = {
        "eval-loss": 0.5,
        "eval-auroc": 0.75,
        "eval-auroc-weight": 20,
        "eval-num-examples": 20,
    }
    results = []
    for node, claimed in ((11, 7), (12, 7), (99, 0)):  # both claim client 7; 99 is no member
        fit = _fit_result(claimed, [np.zeros(4, dtype=np.float32)])
        fit.parameters, fit.metrics = mean, fit.metrics | (scores if node != 99 else {})
        results.append((_proxy(node), fit))
    strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    assert sorted(strategy.recorder.clients) == ["0", "1"]
    initial = strategy.recorder.initial  # round 0's model, scored by the nodes
    assert initial is not None and initial["auroc"] == 0.75


def test_strategy_refuses_individual_updates(tmp_path: Path) -> None:
    results = [
        (_proxy(partition), _fit_result(partition, [np.full(4, partition, dtype=np.float32)]))
        for partition in range(2)
    ]
    with pytest.raises(RuntimeError, match="SecAgg\\+ is not in effect"):
        _strategy(tmp_path).aggregate_fit(1, results, [])  # type: ignore[arg-type]


def test_a_halted_round_stops_the_run_cleanly_and_is_recorded(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    strategy.note_round_without_aggregate(0)  # the initial evaluation is no round
    with pytest.raises(FederationStopped, match="round 1 halted"):
        strategy.note_round_without_aggregate(1)
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    assert report["rounds"] == [{"round": 1, "sampled": 0, "aggregated": False, "survivors": 0}]


def test_secagg_simulations_run_the_harness_secaggplus_client_app(tmp_path: Path) -> None:
    secagg = RunConfig(secagg=True)
    write_flower_app(
        tmp_path, secagg, server_app=SIMULATION_SERVER_APP, client_app=client_app_reference(secagg)
    )
    written = (tmp_path / "pyproject.toml").read_text()
    assert 'serverapp = "simulations.apps:server_app"' in written
    assert 'clientapp = "simulations.apps:secagg_client_app"' in written
    assert client_app_reference(RunConfig()) == "simulations.apps:client_app"
    write_flower_app(tmp_path, secagg, name="deployment")  # what `fedmodel run` submits
    written = (tmp_path / "pyproject.toml").read_text()
    assert 'serverapp = "server.app:app"' in written and 'clientapp = "client.app:app"' in written


@pytest.mark.slow
def test_secagg_mean_equals_fedavg_of_survivors_when_two_of_ten_drop_out(tmp_path: Path) -> None:
    """SecAgg+ over 10 simulated clients, 2 of which fail after sharing their keys.

    The reference is plain FedAvg (example-weighted mean) of the 8 survivors' models,
    which each client process dumps (test only); the coordinator never sees them. The
    difference must stay within `quantization_error_bound`, derived from Flower's
    clipping range (8), quantization range (2**22) and the run's max_weight.
    """
    from tests.conftest import assert_epsilons_recompute
    from tests.test_simulation import simulate

    dump = tmp_path / "client-updates"
    started = time.monotonic()
    _, run_dir = simulate(
        tmp_path,
        *("--dataset", "breast-cancer", "--model", "logreg", "--clients", "10"),
        *("--rounds", "1", "--batch-size", "16", "--no-baselines", "--engine", "local"),
        "--secagg",
        *("--secagg-shares", "5", "--secagg-threshold", "3", "--secagg-dropouts", "2"),
        env={**os.environ, UPDATE_DUMP_VARIABLE: str(dump)},
    )
    print(f"secagg end-to-end: {time.monotonic() - started:.1f} s")

    report = json.loads((run_dir / REPORT_FILE).read_text())
    (round_one,) = report["rounds"]
    assert (round_one["sampled"], round_one["survivors"]) == (10, 8)
    assert round_one["parameter_sets_received"] == 1  # the strategy only ever got the mean
    assert len(round_one["failures"]) == 2
    assert all("simulated dropout after sharing its keys" in f for f in round_one["failures"])

    updates = {int(path.stem.rsplit("-", 1)[1]): np.load(path) for path in dump.glob("*.npz")}
    assert sorted(updates) == list(range(8))  # clients 8 and 9 dropped out before training
    weights = [int(updates[c]["num_examples"]) for c in range(8)]
    models = [[updates[c][f"arr_{i}"] for i in range(len(updates[c].files) - 1)] for c in range(8)]
    exact = [
        sum(w * m[i].astype(np.float64) for w, m in zip(weights, models, strict=True))
        / sum(weights)
        for i in range(len(models[0]))
    ]
    checkpoint = torch.load(run_dir / "checkpoints" / "round-0001.pt", weights_only=True)
    secure = [tensor.double().numpy() for tensor in checkpoint["state_dict"].values()]
    largest = max(float(np.abs(array).max()) for model in models for array in model)
    assert largest <= CLIPPING_RANGE  # nothing was clipped, so the bound applies
    bound = quantization_error_bound(weights, report["protocol"]["max_weight"], largest)
    error = max(float(np.abs(s - e).max()) for s, e in zip(secure, exact, strict=True))
    assert error <= bound, (error, bound)
    for model in models:  # and the mean is no single client's model
        assert (
            max(float(np.abs(s - m).max()) for s, m in zip(secure, model, strict=True))
            > 100 * bound
        )

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and summary["rounds"] == 1
    assert sorted(int(client["client"]) for client in summary["clients"]) == list(range(8))
    assert_epsilons_recompute(summary)
