"""DP-SGD step throughput of the imaging example's CNN: Opacus modes beside plain SGD.

The lesion CNN of examples/lesion_imaging (135k parameters, GroupNorm) trains on its
own generated scans, batches from a DataLoader, under Opacus's
`PrivacyEngine.make_private` in each grad-sample mode (hooks and ew), on the CPU and on
CUDA when there is one. Batches are fixed (no Poisson sampling), so every variant does
the same work per step, and are moved to the device once, so the numbers are the step
itself: forward, per-sample gradients, clipping, noise and the update. Every variant is
warmed up, then timed `repeats` times, interleaved so machine noise hits all alike; the
table shows the median samples per second and its ratio to plain SGD in the same run.
Nothing here is a pass/fail check.

Usage: python -m benchmarks.task_throughput [--quick] [--csv PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader

from benchmarks.dp_overhead import PLAIN, Step, time_steps
from benchmarks.output import write_csv
from fedmodel.config import RunConfig
from fedmodel.task import Site, Task
from fedmodel.task_loading import task_from_reference

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lesion_imaging"
MODES = ("hooks", "ew")
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
BATCHES_PER_LOADER = 4


def lesion_task() -> Task:
    """The example's Task, imported as a user's run would: its directory on the path."""
    sys.path.insert(0, str(EXAMPLE))
    return task_from_reference("lesion_task:task", RunConfig())


def loader(task: Task, batch_size: int) -> DataLoader:
    """BATCHES_PER_LOADER full batches of the example's scans, from as many sites as needed."""
    per_site = len(task.train_data(Site(0, 1, seed=0)))  # type: ignore[arg-type]
    sites = -(-batch_size * BATCHES_PER_LOADER // per_site)
    scans = [task.train_data(Site(i, sites, seed=0)) for i in range(sites)]
    return DataLoader(ConcatDataset(scans), batch_size=batch_size, drop_last=True)


def make_step(task: Task, variant: str, batch_size: int, device: torch.device) -> Step:
    """One optimizer step of `variant` (plain SGD or an Opacus mode), cycling the batches."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = task.model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = loader(task, batch_size)
    if variant != PLAIN:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            engine = PrivacyEngine()
        model, optimizer, data = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=data,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM,
            poisson_sampling=False,  # fixed batches: every variant does equal work
            grad_sample_mode=variant,
        )
    batches = itertools.cycle([(x.to(device), y.to(device)) for x, y in data])

    def step() -> None:
        inputs, targets = next(batches)
        optimizer.zero_grad()
        task.loss(model(inputs), targets).mean().backward()
        optimizer.step()

    return step


def measure(
    task: Task, device: torch.device, batch_size: int, warmup: int, repeats: int, seconds: float
) -> list[dict]:
    """Rows of one device and batch size: each variant's median samples/s, ratio to plain."""
    step_of = {variant: make_step(task, variant, batch_size, device) for variant in (PLAIN, *MODES)}
    steps_of = {}
    for variant, step in step_of.items():
        for _ in range(warmup):
            step()
        steps_of[variant] = max(1, round(seconds / time_steps(step, 1, device)))
    timings: dict[str, list[float]] = {variant: [] for variant in step_of}
    for _ in range(repeats):
        for variant, step in step_of.items():
            timings[variant].append(time_steps(step, steps_of[variant], device))
    rate = {variant: batch_size / statistics.median(times) for variant, times in timings.items()}
    return [
        {
            "device": device.type,
            "mode": variant,
            "batch": batch_size,
            "samples_per_s": round(rate[variant], 1),
            "ratio_to_plain": round(rate[variant] / rate[PLAIN], 3),
        }
        for variant in step_of
    ]


def print_table(rows: list[dict]) -> None:
    print(f"{'device':<7}{'mode':<7}{'batch':>6}{'samples/s':>11}{'x plain':>9}")
    for row in rows:
        print(
            f"{row['device']:<7}{row['mode']:<7}{row['batch']:>6}"
            f"{row['samples_per_s']:>11.1f}{row['ratio_to_plain']:>9.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="batch 64 only, fewer repeats")
    parser.add_argument("--csv", type=Path, default=Path("task_throughput.csv"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    warmup, repeats, seconds = (2, 3, 0.5) if args.quick else (3, 7, 2.0)
    task = lesion_task()
    print(
        f"lesion CNN ({sum(p.numel() for p in task.model().parameters()):,} parameters), "
        f"torch {torch.__version__}, {args.threads} CPU thread(s)"
        + "".join(f", {torch.cuda.get_device_name(d)}" for d in devices if d.type == "cuda")
        + f"; median of {repeats} timings of ~{seconds:g} s of steps, after {warmup} warm-up steps"
    )
    rows: list[dict] = []
    with warnings.catch_warnings():
        # Opacus's hooks fire on the first layer, whose input needs no gradient: harmless.
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        for device in devices:
            batches = [64] if args.quick else [64, 256] + ([1024] if device.type == "cuda" else [])
            for batch_size in batches:
                rows += measure(task, device, batch_size, warmup, repeats, seconds)
    print_table(rows)
    write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
