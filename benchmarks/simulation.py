"""Simulation throughput: FedModel (local and Ray engines) beside stock Flower, one invocation.

Every run is a fresh process tree started from here, one at a time: FedModel through
its real CLI (`fedmodel simulate medical --dataset synthetic-ehr`), the stock baseline
as a plain Flower App (benchmarks/stock_flower: new PrivacyEngine and get_epsilon on
every call, as in Flower's Opacus example) on Flower's Ray engine with
`client-resources-num-cpus=1` and one torch thread per client, on a SuperLink of our
own on 127.0.0.1. The stock clients get FedModel's model shape, feature count, batch
size, learning rate and mean rows per client.

FedModel's noise calibrations are cached per machine; each case starts with an empty
cache, and `fedmodel-local-warm` reruns a case with the cache its cold run left.

Per run: wall time of the whole command, start-up (launch to the initial evaluation),
round 1, the median later round (from per-round evaluation timestamps: FedModel's
checkpoint files, the stock server's log line), client-rounds per second over the whole
run and in steady state, and peak memory (the summed RSS of every process under this
one, sampled every 0.2 s from /proc).

Usage: python benchmarks/simulation.py [--quick] [--clients N] [--csv simulation.csv] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedmodel.config import RunConfig
from fedmodel.privacy.accounting_cache import CACHE_DIR_VARIABLE
from fedmodel.runtime.flwr_run import flwr_run_command, stream_run_output
from fedmodel.runtime.processes import executable, start_detached
from simulations.runner import engine_environment, local_superlink

STOCK_APP = Path(__file__).resolve().parent / "stock_flower"
ROUND_MARKER = "stock-round-done "  # benchmarks/stock_flower/stockapp/server.py
SCENARIO = ("medical", "synthetic-ehr")
# synthetic-ehr's own defaults are logistic regression at lr 2 (issue 20); the benchmarks
# measure the MLP at the shared lr, the model the stock App trains too.
MODEL_FLAGS = ("--model", "mlp", "--lr", str(RunConfig().lr))
SYSTEMS = ("fedmodel-local", "fedmodel-ray", "stock-flower-ray")
WARM = "fedmodel-local-warm"  # the same case again, noise calibrations already cached
PAGE = os.sysconf("SC_PAGE_SIZE")
GIB = 1024**3


@dataclass(frozen=True)
class Case:
    clients: int
    fraction: float
    rounds: int
    systems: tuple[str, ...] = SYSTEMS

    @property
    def per_round(self) -> int:
        return max(1, int(self.clients * self.fraction))


QUICK = (
    Case(10, 1.0, 3),
    Case(100, 0.1, 5),
    Case(1_000, 0.1, 3, ("fedmodel-local", WARM, "stock-flower-ray")),
    Case(10_000, 0.01, 3, ("fedmodel-local",)),
)
FULL = (
    Case(10, 1.0, 5),
    Case(100, 0.1, 5),
    Case(100, 1.0, 3),
    Case(1_000, 0.1, 3, (*SYSTEMS, WARM)),
    Case(1_000, 0.01, 5),
    Case(10_000, 0.01, 3, ("fedmodel-local", "stock-flower-ray")),
)


@dataclass
class Measurement:
    system: str
    clients: int
    fraction: float
    rounds: int
    clients_per_round: int
    wall_s: float
    startup_s: float
    first_round_s: float
    later_round_s: float
    client_rounds_per_s: float
    steady_client_rounds_per_s: float
    peak_memory_gib: float
    load_average: float  # 1-minute load when the run ended: other jobs share the box
    completed: bool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small grid (< 10 min)")
    parser.add_argument("--csv", type=Path, default=Path("simulation.csv"))
    parser.add_argument("--keep", type=Path, help="keep run directories here")
    parser.add_argument("--clients", type=int, help="only the grid's cases with this many")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="fedmodel-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[Measurement] = []
    started = time.monotonic()
    try:
        grid = QUICK if args.quick else FULL
        for case in [c for c in grid if args.clients in (None, c.clients)]:
            for system in case.systems:
                result = measure(system, case, work / f"{system}-{case.clients}-{case.fraction}")
                results.append(result)
                print(_row(result), flush=True)
                write_csv(args.csv, results)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(results)
    print(f"\n{len(results)} runs in {time.monotonic() - started:.0f} s; CSV: {args.csv}")


def measure(system: str, case: Case, run_dir: Path) -> Measurement:
    """One run of `system` on `case`, timed and with the tree's memory sampled."""
    run_dir.mkdir(parents=True)
    with peak_tree_memory() as peak:
        launched = time.time()
        if system == "stock-flower-ray":
            completed, marks = run_stock(case, run_dir)
        else:
            engine = "ray" if system == "fedmodel-ray" else "local"
            cache = run_dir.parent / f"cache-{case.clients}-{case.fraction}-{engine}"
            completed, marks = run_fedmodel(case, engine, run_dir, cache)
        ended = time.time()
    wall = ended - launched
    rounds = [marks[r] - marks[r - 1] for r in range(1, len(marks))]
    later = statistics.median(rounds[1:]) if len(rounds) > 1 else float("nan")
    return Measurement(
        system=system,
        clients=case.clients,
        fraction=case.fraction,
        rounds=case.rounds,
        clients_per_round=case.per_round,
        wall_s=wall,
        startup_s=marks[0] - launched if marks else float("nan"),
        first_round_s=rounds[0] if rounds else float("nan"),
        later_round_s=later,
        client_rounds_per_s=case.per_round * case.rounds / wall,
        steady_client_rounds_per_s=case.per_round / later,
        peak_memory_gib=peak[0] / GIB,
        load_average=os.getloadavg()[0],
        completed=completed and len(marks) == case.rounds + 1,
    )


def run_fedmodel(case: Case, engine: str, run_dir: Path, cache: Path) -> tuple[bool, list[float]]:
    """FedModel's CLI; rounds end when their checkpoint is written (round 0: initial model).

    `cache` holds the noise calibrations (fedmodel.privacy.accounting_cache): a new one
    per case and engine, so every run starts cold except the `-warm` rerun.
    """
    scenario, dataset = SCENARIO
    output = run_dir / "run"
    command = [
        executable("fedmodel"),
        "simulate",
        scenario,
        "--dataset",
        dataset,
        "--clients",
        str(case.clients),
        "--fraction",
        str(case.fraction),
        "--rounds",
        str(case.rounds),
        "--no-baselines",
        *MODEL_FLAGS,
        "--engine",
        engine,
        "--output",
        str(output),
    ]
    environment = {**os.environ, CACHE_DIR_VARIABLE: str(cache)}
    process = start_detached(command, run_dir / "cli.log", environment)
    try:
        process.wait()
    finally:  # interrupted: SIGTERM lets the CLI stop every engine process it started
        if process.poll() is None:
            process.terminate()
            process.wait()
    checkpoints = sorted((output / "checkpoints").glob("round-*.pt"))
    return process.returncode == 0, [path.stat().st_mtime for path in checkpoints]


def run_stock(case: Case, run_dir: Path) -> tuple[bool, list[float]]:
    """The stock App on a SuperLink of ours (started and stopped inside the timing)."""
    app_dir = run_dir / "app"
    shutil.copytree(STOCK_APP, app_dir, ignore=shutil.ignore_patterns("__pycache__"))
    engine_dir = run_dir / "engine"
    engine_dir.mkdir()
    environment = engine_environment(engine_dir)
    marks: dict[int, float] = {}  # Flower streams each server log line in two formats

    def record(line: str) -> None:
        if ROUND_MARKER in line:
            server_round, stamp = line.split(ROUND_MARKER, 1)[1].split()[:2]
            marks[int(server_round)] = float(stamp)

    with local_superlink(engine_dir, environment) as port:
        environment["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(port)
        command = flwr_run_command(
            app_dir,
            "local",
            "--federation-config",
            f"num-supernodes={case.clients} client-resources-num-cpus=1",
            "--run-config",
            " ".join(f"{key}={value}" for key, value in stock_run_config(case).items()),
        )
        code = stream_run_output(command, engine_dir, environment, lambda _: None, record)
    return code == 0, [marks[r] for r in sorted(marks)]


def stock_run_config(case: Case) -> dict[str, float | int]:
    """The stock App's settings: FedModel's defaults and FedModel's data sizes for `case`."""
    from fedmodel.datasets.scenarios import federation

    config = RunConfig(scenario=SCENARIO[0], dataset=SCENARIO[1], clients=min(case.clients, 1_000))
    fed = federation(config)
    sizes = [len(fed.clients[i]) for i in range(config.clients)]
    return {
        "num-rounds": case.rounds,
        "num-nodes": case.clients,
        "fraction-train": case.fraction,
        "num-features": fed.test.num_features,
        "rows-per-client": round(statistics.mean(sizes)),
        "batch-size": config.batch_size,
        "lr": config.lr,
    }


@contextmanager
def sampled(sample: Callable[[], None], interval: float) -> Iterator[None]:
    """Call `sample` every `interval` seconds in a thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            sample()
            stop.wait(interval)

    sampler = threading.Thread(target=loop, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()


@contextmanager
def peak_tree_memory(interval: float = 0.2) -> Iterator[list[int]]:
    """Yield [peak bytes], the largest summed RSS of this process's descendants seen."""
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], sum(_rss(pid) for pid in _descendants(os.getpid())))

    with sampled(sample, interval):
        yield peak


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, []):
            found.append(child)
            frontier.append(child)
    return found


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def write_csv(path: Path, results: list[Measurement]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f.name for f in fields(Measurement)])
        writer.writerows([list(asdict(result).values()) for result in results])


HEADER = (
    f"{'system':<17} {'clients':>7} {'frac':>5} {'rds':>3} {'wall s':>7} {'start s':>7} "
    f"{'round1 s':>8} {'later s':>8} {'cr/s':>7} {'steady':>7} {'GiB':>5} {'load':>5} ok"
)


def _row(r: Measurement) -> str:
    return (
        f"{r.system:<17} {r.clients:>7} {r.fraction:>5g} {r.rounds:>3} {r.wall_s:>7.1f} "
        f"{r.startup_s:>7.1f} {r.first_round_s:>8.2f} {r.later_round_s:>8.2f} "
        f"{r.client_rounds_per_s:>7.1f} {r.steady_client_rounds_per_s:>7.1f} "
        f"{r.peak_memory_gib:>5.2f} {r.load_average:>5.1f} {'yes' if r.completed else 'NO'}"
    )


def print_table(results: list[Measurement]) -> None:
    """All runs, then each FedModel run's speed-up over the stock run of the same case."""
    print(HEADER)
    for result in results:
        print(_row(result))
    stock = {(r.clients, r.fraction, r.rounds): r for r in results if r.system.startswith("stock")}
    print("\nFedModel / stock Flower (same case, same invocation):")
    print(f"{'system':<17} {'clients':>7} {'frac':>5} {'wall':>6} {'cr/s':>6} {'steady':>7}")
    for r in results:
        base = stock.get((r.clients, r.fraction, r.rounds))
        if base is None or r is base or not (r.completed and base.completed):
            continue
        print(
            f"{r.system:<17} {r.clients:>7} {r.fraction:>5g} "
            f"{base.wall_s / r.wall_s:>5.1f}x "
            f"{r.client_rounds_per_s / base.client_rounds_per_s:>5.1f}x "
            f"{r.steady_client_rounds_per_s / base.steady_client_rounds_per_s:>6.1f}x"
        )


if __name__ == "__main__":
    sys.exit(main())
