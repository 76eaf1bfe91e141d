"""Distributed DP under SecAgg+ against central DP in real simulations on synthetic-ehr.

Runs `fedmodel simulate medical --dataset synthetic-ehr` with every client in every round
(`--clients`, default 100), once with `--dp client` (the coordinator clips and noises)
and once with `--dp distributed` per bit width (the clients do, under SecAgg+), at the
same client-level noise multiplier and clip norm 1, so the two epsilons differ only by
what discretisation costs. Prints per run: client-level epsilon, final AUROC, seconds per
round, and what each client uploads per round against float32 weights.

Usage: python -m benchmarks.distributed_dp_utility [--clients N] [--rounds R] [--noise Z]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.simulation import MODEL_FLAGS
from fedmodel.privacy.distributed_dp import DistributedDpParameters
from fedmodel.run_directory import SUMMARY_FILE


def simulate(run_dir: Path, clients: int, rounds: int, extra: list[str]) -> dict[str, Any]:
    """One simulation through the CLI; its summary."""
    command = [
        *(sys.executable, "-m", "fedmodel.cli", "simulate", "medical"),
        *("--dataset", "synthetic-ehr", "--clients", str(clients), "--rounds", str(rounds)),
        *("--no-baselines", *MODEL_FLAGS, "--engine", "local", "--output", str(run_dir)),
        *extra,
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return dict(json.loads((run_dir / SUMMARY_FILE).read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 20])
    args = parser.parse_args()
    noise = f"{args.noise:g}"
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        central = simulate(
            Path(scratch) / "central",
            args.clients,
            args.rounds,
            ["--dp", "client", "--central-noise", noise, "--central-clipping-norm", "1"],
        )
        dimension: int | None = None
        rows.append(
            ("central (--dp client)", central["client_level_dp"]["epsilon"], central, "1.00x")
        )
        for bits in args.bits:
            run_dir = Path(scratch) / f"distributed-{bits}"
            summary = simulate(
                run_dir,
                args.clients,
                args.rounds,
                [
                    "--dp",
                    "distributed",
                    "--distributed-noise",
                    noise,
                    "--distributed-bits",
                    str(bits),
                ],
            )
            protocol = json.loads((run_dir / "secagg.json").read_text())["protocol"]
            mechanism = DistributedDpParameters(**protocol["distributed_dp"])
            dimension = mechanism.dimension
            upload = mechanism.padded_dimension * bits / (32 * mechanism.dimension)
            rows.append(
                (
                    f"distributed, {bits} bits",
                    summary["client_level_dp"]["epsilon"],
                    summary,
                    f"{upload:.2f}x",
                )
            )
    print(
        f"{args.clients} synthetic-ehr clients per round, {args.rounds} rounds, client-level "
        f"noise multiplier {noise}, clip 1, delta 1e-5, model of {dimension} parameters"
    )
    print("| mechanism | epsilon | final AUROC | initial AUROC | s per round | upload vs float32 |")
    print("|---|---|---|---|---|---|")
    for name, epsilon, summary, upload in rows:
        print(
            f"| {name} | {epsilon:.3f} | {summary['final']['auroc']:.4f} | "
            f"{summary['initial']['auroc']:.4f} | {summary['seconds'] / args.rounds:.1f} | "
            f"{upload} |"
        )


if __name__ == "__main__":
    main()
