"""How each aggregation rule holds up against simulated attackers (medical scenario).

Runs `fedmodel simulate medical` once without attackers and once per rule with a fraction
of clients sending gaussian noise (sd 100) on their weights, then prints final test AUROC
and the drop from the attack-free run. Usage:
  python -m benchmarks.robustness [--clients 10] [--rounds 5] [--attackers 0.2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RULES = ("fedavg", "median", "trimmed-mean", "krum")


def simulate(run_dir: Path, clients: int, rounds: int, *extra: str) -> dict:
    command = [
        sys.executable, "-m", "fedmodel.cli", "simulate", "medical", "--clients", str(clients),
        "--rounds", str(rounds), "--no-baselines", "--output", str(run_dir), *extra,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
    if result.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(extra)}): {result.stderr.strip()[-500:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--attackers", type=float, default=0.2)
    args = parser.parse_args()
    byzantine = round(args.attackers * args.clients)
    with tempfile.TemporaryDirectory() as scratch:
        clean = simulate(Path(scratch) / "clean", args.clients, args.rounds)["final"]["auroc"]
        rows = [("fedavg", "none", clean)]
        for rule in RULES:
            summary = simulate(
                Path(scratch) / rule, args.clients, args.rounds,
                "--aggregator", rule, "--byzantine", str(byzantine),
                "--attack", "gaussian", "--attackers", str(args.attackers),
            )  # fmt: skip
            rows.append((rule, f"gaussian x{byzantine}", summary["final"]["auroc"]))
    print(f"{args.clients} clients, {args.rounds} rounds, DP epsilon 1, medical (flchain)")
    print(f"{'aggregator':<14} {'attack':<14} {'final AUROC':>11} {'vs clean':>9}")
    for rule, attack, auroc in rows:
        print(f"{rule:<14} {attack:<14} {auroc:>11.4f} {auroc - clean:>+9.4f}")


if __name__ == "__main__":
    main()
