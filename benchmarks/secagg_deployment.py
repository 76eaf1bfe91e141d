"""SecAgg+ rounds on a deployed federation against plain aggregation, by node count.

For each node count, one TLS federation on 127.0.0.1 made with the fedmodel CLI
(benchmarks/deployment_federation.py: 400 flchain rows per node, label `death`), and
two runs of the same rounds on it: `fedmodel run` (plain FedAvg, one train message per
node and round) and `fedmodel run --secagg --secagg-shares 3 --secagg-threshold 2`
(SecAgg+: four train messages per node and round, setup, share keys, collect masked
vectors, unmask), each at epsilon 30 so that both fit in the owners' budget of 100.

A round's time is the time between successive `fedmodel run` progress lines, rounds
3..R (round 1 also holds start-up and the query round); medians over those rounds.
SecAgg+ needs at least 3 nodes (3 shares, Flower's clients crash on fewer or an even
number), so the smallest federation measured has 3.

Usage: python -m benchmarks.secagg_deployment [--rounds 5] [--nodes 3 4] [--csv PATH]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.deployment_federation import (
    ROWS_PER_NODE,
    STARTED,
    Federation,
    federation_on_loopback,
    make_federation,
    run_federation,
    say,
    start_fedmodel_nodes,
    stop_fedmodel_nodes,
    wait_for_online,
)
from benchmarks.output import write_csv

PLAIN, SECURE = "plain FedAvg", "SecAgg+"
SECAGG_OPTIONS = ("--secagg", "--secagg-shares", "3", "--secagg-threshold", "2")
# both runs fit in each owner's budget (the ledger keeps what the first spent)
RUN_EPSILON = 30.0
RUN_OPTIONS = ("--epsilon", str(RUN_EPSILON))


@dataclass(frozen=True)
class RoundTime:
    """One round of one run."""

    nodes: int
    variant: str
    round: int
    round_s: float


def measure(federation: Federation, variant: str, rounds: int) -> list[RoundTime]:
    """One run of `variant` on the running nodes; the time of each round 3..R."""
    say(f"{len(federation.nodes)} nodes, {variant}: {rounds} rounds")
    output = federation.root / "runs" / f"{len(federation.nodes)}-{variant.split()[0]}"
    options = (*RUN_OPTIONS, *(SECAGG_OPTIONS if variant == SECURE else ()))
    arrived = run_federation(federation, rounds, output, options)
    return [
        RoundTime(len(federation.nodes), variant, t, arrived[t - 1] - arrived[t - 2])
        for t in range(3, rounds + 1)
    ]


def print_table(times: list[RoundTime], rounds: int) -> None:
    print(
        f"SecAgg+ in deployment on 127.0.0.1 over TLS: {ROWS_PER_NODE} flchain rows per node, "
        f"{rounds} rounds, epsilon {RUN_EPSILON:g}, CPU; medians over rounds 3-{rounds}"
    )
    columns = ("plain s", "SecAgg+ s", "overhead s", "x plain")
    print(f"{'nodes':<8}" + "".join(f"{name:>12}" for name in columns))
    for nodes in sorted({row.nodes for row in times}):
        plain, secure = (
            statistics.median(r.round_s for r in times if r.nodes == nodes and r.variant == v)
            for v in (PLAIN, SECURE)
        )
        values = (plain, secure, secure - plain, secure / plain)
        print(f"{nodes:<8}" + "".join(f"{value:>12.2f}" for value in values))
    print(
        "round s: between successive `fedmodel run` progress lines. A plain round is one "
        "message per node; a SecAgg+ round four, each paying the SuperNode's polling "
        "(benchmarks/deployment.py), plus the key agreement and masking."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (at least 3)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 4], help="node counts")
    parser.add_argument("--csv", type=Path, help="also write every measured round here")
    parser.add_argument("--keep", action="store_true", help="keep the working directories")
    args = parser.parse_args()
    if args.rounds < 3 or not all(3 <= nodes <= 19 for nodes in args.nodes):
        parser.error("--rounds must be at least 3 and every --nodes 3-19 (SecAgg+ needs 3)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on SIGTERM too
    times: list[RoundTime] = []
    for nodes in args.nodes:
        with federation_on_loopback(nodes, args.keep) as federation:
            make_federation(federation)
            start_fedmodel_nodes(federation)
            try:
                wait_for_online(federation, nodes)
                for variant in (PLAIN, SECURE):
                    times += measure(federation, variant, args.rounds)
            finally:
                stop_fedmodel_nodes(federation)
    print()
    print_table(times, args.rounds)
    if args.csv is not None:
        write_csv(args.csv, [asdict(row) for row in times])
    print(f"{2 * len(args.nodes)} runs in {time.monotonic() - STARTED:.0f} s")


if __name__ == "__main__":
    main()
