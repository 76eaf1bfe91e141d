"""FedModel's local engine on a chosen device: the simulation benchmark's FedModel rows only.

For a machine without Ray or FedModel's console script (e.g. a GPU machine where
FedModel travels as a source tree): runs `python -m fedmodel.cli simulate medical
--dataset synthetic-ehr --no-baselines --engine local --device D` for each case and
device, one run at a time, each with an empty accounting cache (cold, as in
benchmarks/simulation.py), and measures it exactly as simulation.py does (wall time,
start-up, round 1, median later round from checkpoint times, client-rounds per second,
peak RSS of the process tree), plus the GPU's peak memory in use and utilisation
(nvidia-smi, sampled every 0.5 s) when nvidia-smi is there. No stock baseline.

Usage: python -m benchmarks.simulation_device [--devices cpu,cuda]
       [--cases 1000x0.1x3,10000x0.01x3] [--csv simulation_device.csv] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.output import write_csv
from benchmarks.simulation import (
    GIB,
    MODEL_FLAGS,
    SCENARIO,
    Case,
    peak_tree_memory,
    sampled,
)
from fedmodel.privacy.accounting_cache import CACHE_DIR_VARIABLE
from fedmodel.runtime.processes import start_detached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--cases", default="1000x0.1x3,10000x0.01x3")
    parser.add_argument("--csv", type=Path, default=Path("simulation_device.csv"))
    parser.add_argument("--keep", type=Path, help="keep run directories here")
    parser.add_argument("--budget", type=float, default=0, help="stop starting runs after this")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    args = parser.parse_args()
    cases = [
        Case(int(c), float(f), int(r)) for c, f, r in (s.split("x") for s in args.cases.split(","))
    ]
    work = args.keep or Path(tempfile.mkdtemp(prefix="fedmodel-device-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows: list[dict[str, object]] = []
    try:
        for case in cases:
            for device in args.devices.split(","):
                left = args.budget - (time.monotonic() - started) if args.budget else args.timeout
                if left < 10:
                    print(f"skipped {case.clients} clients on {device}: budget spent", flush=True)
                    continue
                run_dir = work / f"{device}-{case.clients}-{case.fraction}"
                row = measure(case, device, run_dir, min(args.timeout, left))
                rows.append(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                write_csv(args.csv, rows)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(rows)} runs in {time.monotonic() - started:.0f} s; CSV: {args.csv}")


def measure(case: Case, device: str, run_dir: Path, timeout: float) -> dict[str, object]:
    scenario, dataset = SCENARIO
    output = run_dir / "run"
    run_dir.mkdir(parents=True)
    command = [
        sys.executable, "-m", "fedmodel.cli", "simulate", scenario, "--dataset", dataset,
        "--clients", str(case.clients), "--fraction", str(case.fraction),
        "--rounds", str(case.rounds), "--no-baselines", *MODEL_FLAGS, "--engine", "local",
        "--device", device, "--output", str(output),
    ]  # fmt: skip
    environment = {**os.environ, CACHE_DIR_VARIABLE: str(run_dir / "cache")}
    with peak_tree_memory() as peak, gpu_peak() as gpu:
        launched = time.time()
        process = start_detached(command, run_dir / "cli.log", environment)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:  # SIGTERM lets the CLI stop its workers
            if process.poll() is None:
                process.terminate()
                process.wait()
        ended = time.time()
    marks = [p.stat().st_mtime for p in sorted((output / "checkpoints").glob("round-*.pt"))]
    rounds = [marks[r] - marks[r - 1] for r in range(1, len(marks))]
    later = statistics.median(rounds[1:]) if len(rounds) > 1 else float("nan")
    wall = ended - launched
    completed = process.returncode == 0 and len(marks) == case.rounds + 1
    if not completed:
        print((run_dir / "cli.log").read_text()[-3000:], flush=True)
    return {
        "system": f"fedmodel-local-{device}",
        "clients": case.clients,
        "fraction": case.fraction,
        "rounds": case.rounds,
        "clients_per_round": case.per_round,
        "wall_s": round(wall, 2),
        "startup_s": round(marks[0] - launched, 2) if marks else float("nan"),
        "first_round_s": round(rounds[0], 2) if rounds else float("nan"),
        "later_round_s": round(later, 2),
        "client_rounds_per_s": round(case.per_round * case.rounds / wall, 2),
        "steady_client_rounds_per_s": round(case.per_round / later, 2),
        "peak_memory_gib": round(peak[0] / GIB, 2),
        "gpu_peak_mib": gpu[0],
        "gpu_peak_util_pct": gpu[1],
        "load_average": round(os.getloadavg()[0], 1),
        "cores": len(os.sched_getaffinity(0)),
        "completed": completed,
    }


@contextmanager
def gpu_peak(interval: float = 0.5) -> Iterator[list[float]]:
    """Yield [peak MiB in use, peak utilisation %] of GPU 0 (nan without nvidia-smi)."""
    peak = [float("nan"), float("nan")]
    if shutil.which("nvidia-smi") is None:
        yield peak
        return
    query = ["nvidia-smi", "-i", "0", "--query-gpu=memory.used,utilization.gpu"]
    query.append("--format=csv,noheader,nounits")
    peak[0] = peak[1] = 0.0

    def sample() -> None:
        try:
            used, util = subprocess.run(query, capture_output=True, text=True).stdout.split(",")
            peak[0], peak[1] = max(peak[0], float(used)), max(peak[1], float(util))
        except (OSError, ValueError):
            pass

    with sampled(sample, interval):
        yield peak


if __name__ == "__main__":
    main()
