"""Noise calibration time: Opacus's `get_noise_multiplier` beside ours, one process.

A simulated client calibrates once per new (sample rate, steps); sample rate is one over
its batches per epoch, so small sites (2-3 batches) are common in a heterogeneous
federation. Prints, per client size, the median wall time of each (Opacus first, ours
second, alternating), their ratio and whether the answers are identical.
Usage: python -m benchmarks.calibration [--repeats N] [--epsilon E] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

from opacus.accountants.utils import get_noise_multiplier

from fedmodel.privacy.calibration import calibrated_noise_multiplier

BATCHES_PER_EPOCH = (1, 2, 3, 5, 13, 50, 200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Optimal order")
    print(f"epsilon {args.epsilon}, delta {args.delta:g}, {args.rounds} rounds of one epoch")
    print(f"{'batches':>8} {'sample rate':>12} {'opacus ms':>10} {'ours ms':>9} {'ratio':>7} same")
    for batches in BATCHES_PER_EPOCH:
        rate, steps = 1 / batches, args.rounds * batches
        timings: dict[str, list[float]] = {"opacus": [], "ours": []}
        answers = set()
        for _ in range(args.repeats):
            started = time.perf_counter()
            answers.add(
                get_noise_multiplier(
                    target_epsilon=args.epsilon,
                    target_delta=args.delta,
                    sample_rate=rate,
                    steps=steps,
                )
            )
            timings["opacus"].append(time.perf_counter() - started)
            started = time.perf_counter()
            answers.add(calibrated_noise_multiplier(args.epsilon, args.delta, rate, steps))
            timings["ours"].append(time.perf_counter() - started)
        opacus, ours = (statistics.median(timings[name]) * 1000 for name in ("opacus", "ours"))
        same = "yes" if len(answers) == 1 else "NO"
        print(
            f"{batches:>8} {rate:>12.4f} {opacus:>10.1f} {ours:>9.1f} {opacus / ours:>6.0f}x {same}"
        )


if __name__ == "__main__":
    main()
