"""What distributed discrete Gaussian DP costs against central DP at the same noise.

For one model size (`--dimension`) and cohort (`--clients`, clipping 1, client-level
noise multiplier `--noise`, each client adding sigma = noise / sqrt(clients)), prints
per bit width: the granularity `plan_granularity` picks for a 1e-6 overflow bound, the
noise in integer steps, how much rounding inflates the sensitivity, epsilon after
`--rounds` releases (DDG accounting) beside the central Gaussian's at the same noise,
the decoded error beside the noise alone (one trial, mean squared, per coordinate),
the upload per client against float32, and the time to encode one update and decode
the sum.

Usage: python -m benchmarks.distributed_dp [--dimension D] [--clients N] [--rounds R]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np

from fedmodel.privacy.accountant import epsilon_of
from fedmodel.privacy.distributed_accounting import DistributedRelease, distributed_epsilon
from fedmodel.privacy.distributed_dp import clip, decode, encode, modular_sum, plan_granularity

BITS = (12, 14, 16, 18, 20, 24, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dimension", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--noise", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Optimal order")
    generator = np.random.default_rng(0)
    updates = [
        generator.normal(size=args.dimension) / math.sqrt(args.dimension)
        for _ in range(args.clients)
    ]
    exact = sum(clip(update, 1.0) for update in updates)
    central = epsilon_of([(args.noise, 1.0, args.rounds)], args.delta)
    noise_only = args.noise**2  # per-coordinate variance of the central mechanism's noise
    print(
        f"d={args.dimension}, {args.clients} clients, noise multiplier {args.noise}, "
        f"{args.rounds} rounds, delta {args.delta:g}: central epsilon {central:.3f}"
    )
    print(
        f"{'bits':>4} {'gamma':>9} {'sigma/step':>10} {'sens x':>7} {'epsilon':>8} "
        f"{'mse/noise':>9} {'upload x':>8} {'enc ms':>7} {'dec ms':>7}"
    )
    for bits in BITS:
        try:
            parameters = plan_granularity(
                1.0, args.noise / math.sqrt(args.clients), bits, args.clients, args.dimension
            )
        except Exception as refused:  # noqa: BLE001 - the table shows why a width is refused
            print(f"{bits:>4} refused: {refused}")
            continue
        started = time.perf_counter()
        residues = [encode(update, parameters, 1, generator) for update in updates]
        encode_ms = (time.perf_counter() - started) * 1000 / args.clients
        started = time.perf_counter()
        decoded = decode(modular_sum(residues, parameters.modulus), parameters, 1)
        decode_ms = (time.perf_counter() - started) * 1000
        releases = [DistributedRelease(1, parameters, args.clients)] * args.rounds
        print(
            f"{bits:>4} {parameters.granularity:>9.2e} {parameters.integer_stddev:>10.1f} "
            f"{parameters.norm_bound * parameters.granularity:>7.3f} "
            f"{distributed_epsilon(releases, args.delta):>8.3f} "
            f"{np.mean((decoded - exact) ** 2) / noise_only:>9.3f} "
            f"{bits * parameters.padded_dimension / (32 * args.dimension):>8.2f} "
            f"{encode_ms:>7.1f} {decode_ms:>7.1f}"
        )


if __name__ == "__main__":
    main()
