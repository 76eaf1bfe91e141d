"""Cost of one client's training round: plain SGD vs DP-SGD vs the accounting around it.

Runs in one process on one thread, interleaving the variants so machine noise hits
them alike, and prints median wall times and the ratio to the plain-SGD baseline.
Usage: python -m benchmarks.bench_client_round [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from opacus.accountants.utils import get_noise_multiplier

from fedmodel.config import RunConfig
from fedmodel.data import make_loader
from fedmodel.datasets.scenarios import client_partitions
from fedmodel.models import ClassifierLoss, build_model
from fedmodel.privacy.accountant import epsilon_of
from fedmodel.privacy.calibration import calibrate_noise_multiplier, calibrated_noise_multiplier
from fedmodel.training import train_dp, train_plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = RunConfig()
    data = client_partitions(config)[0]
    cpu = torch.device("cpu")
    loader = make_loader(data.dataset(), config.batch_size, seed=0)
    loss = ClassifierLoss(reduction="none")
    rate = 1 / len(loader)
    steps = config.rounds * len(loader)
    noise = calibrate_noise_multiplier(config.epsilon, config.delta, rate, steps)
    history = [(noise, rate, 4 * len(loader))]

    variants: dict[str, Callable[[], object]] = {
        "plain SGD epoch (baseline)": lambda: train_plain(
            build_model("mlp", data.num_features), loss, loader, 1, config.lr, cpu
        ),
        "DP-SGD epoch (Opacus)": lambda: train_dp(
            build_model("mlp", data.num_features),
            loss,
            loader,
            1,
            config.lr,
            noise,
            1.0,
            history,
            cpu,
        ),
        "epsilon: fresh Opacus RDPAccountant": lambda: _opacus_epsilon(history, config.delta),
        "epsilon: ours (cached RDP curve)": lambda: epsilon_of(history, config.delta),
        "noise calibration: Opacus's search": lambda: get_noise_multiplier(
            target_epsilon=config.epsilon, target_delta=config.delta, sample_rate=rate, steps=steps
        ),
        "noise calibration: ours (same answer)": lambda: calibrated_noise_multiplier(
            config.epsilon, config.delta, rate, steps
        ),
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - started)
    baseline = statistics.median(timings["plain SGD epoch (baseline)"])
    print(f"one client: {len(data)} rows, batch {config.batch_size}, {len(loader)} steps/epoch")
    print(f"{'variant':<36} {'median ms':>10} {'x baseline':>11}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:<36} {median * 1000:>10.1f} {median / baseline:>11.1f}")


def _opacus_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """What Flower's Opacus example does on every call: a new accountant per check."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.load_state_dict({"history": history, "mechanism": "rdp"})
    return float(accountant.get_epsilon(delta))


if __name__ == "__main__":
    main()
