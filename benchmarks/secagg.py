"""What secure aggregation (SecAgg+) costs per round: the same federation with and without it.

For each number of clients, runs the medical scenario (flchain, logistic regression,
DP-SGD, every client sampled) twice through `simulations.runner.run_federation`, once
plain and once with `--secagg` (Flower's default quantization, 5 shares, threshold 3),
and times the rounds after the first (the first pays worker start-up). A round is
everything between two central evaluations: sampling, local DP training, aggregation
(SecAgg+: four message exchanges, key agreement, masking, unmasking) and evaluation.
Prints a table with the ratios and writes a CSV.

Usage: python -m benchmarks.secagg [--quick] [--rounds N] [--engine local|ray] [--csv PATH]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.output import write_csv
from fedmodel.config import RunConfig
from simulations.runner import ENGINES, run_federation

CLIENTS = (10, 20, 50)


def round_seconds(config: RunConfig, run_dir: Path, engine: str) -> list[float]:
    """Wall time of each round after the first, from the progress line each round logs."""
    finished: list[float] = []
    run_federation(config, run_dir, lambda _: finished.append(time.monotonic()), engine=engine)
    return [later - earlier for earlier, later in zip(finished, finished[1:], strict=False)]


def measure(clients: int, rounds: int, engine: str, scratch: Path) -> dict[str, float | int]:
    plain = RunConfig(clients=clients, rounds=rounds, model="logreg")
    times = {}
    for name, config in (("plain", plain), ("secagg", plain.replace(secagg=True))):
        times[name] = statistics.median(
            round_seconds(config, scratch / f"{name}-{clients}", engine)
        )
    return {
        "clients": clients,
        "rounds_timed": rounds - 1,
        "plain_s": round(times["plain"], 3),
        "secagg_s": round(times["secagg"], 3),
        "ratio": round(times["secagg"] / times["plain"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="10 and 20 clients, 1 timed round")
    parser.add_argument("--engine", choices=ENGINES, default="local")
    parser.add_argument("--csv", type=Path, default=Path("secagg.csv"))
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (first untimed)")
    args = parser.parse_args()
    clients, rounds = ((10, 20), 2) if args.quick else (CLIENTS, max(2, args.rounds))
    with tempfile.TemporaryDirectory() as scratch:
        rows = [measure(n, rounds, args.engine, Path(scratch)) for n in clients]
    print(f"median round time, {args.engine} engine, flchain, logreg, DP-SGD, all clients")
    print(f"{'clients':>7} {'plain (s)':>10} {'SecAgg+ (s)':>12} {'ratio':>6}")
    for row in rows:
        times = f"{row['plain_s']:>10.2f} {row['secagg_s']:>12.2f}"
        print(f"{row['clients']:>7} {times} {row['ratio']:>5.2f}x")
    write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
