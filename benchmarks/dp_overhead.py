"""Cost of DP-SGD per optimizer step: plain SGD vs each DP mode, per model.

For every model in the registry and a few realistic batch sizes, one process builds
plain SGD and DP-SGD in each Opacus 1.6 mode (hooks, ghost clipping, functorch, ew) and
in our fused step for Linear-only models (fedmodel/fused_dp.py) on
the same fixed batch, warms them up, then times them interleaved (so machine noise hits
all alike) and reports the median time per step, its ratio to plain SGD, and the peak
memory one step needs above the resting state (CUDA: the caching allocator's peak; CPU:
the process's resident-set high-water mark, reset before each step). Nothing here is a
pass/fail check: it prints a table and writes CSV.

Usage: python -m benchmarks.dp_overhead [--device cpu|cuda] [--quick] [--csv PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.output import write_csv
from fedmodel.dp_modes import GRAD_SAMPLE_MODES, grad_sample_mode
from fedmodel.errors import ConfigError
from fedmodel.models import MODELS, ClassifierLoss, build_model
from fedmodel.training import make_private, privacy_engine

PLAIN = "plain"
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
MAX_STEPS = 50  # per timing


@dataclass(frozen=True)
class Case:
    """One model at one batch size; features and classes as in a FedModel scenario."""

    model: str
    num_features: int
    num_classes: int
    batch_size: int


MODEL_INPUTS = {  # (features, classes): flchain (the default scenario) and MNIST digits
    "mlp": (8, 2),
    "logreg": (8, 2),
    "cnn": (784, 10),
}


def cases(device: torch.device, quick: bool) -> list[Case]:
    """Default batch 64 and a larger one; GPUs are there for larger batches still."""
    batches = [64] if quick else [64, 256] + ([1024] if device.type == "cuda" else [])
    return [Case(name, *MODEL_INPUTS[name], batch) for name in sorted(MODELS) for batch in batches]


Step = Callable[[], None]


def make_step(case: Case, variant: str, device: torch.device) -> Step:
    """One optimizer step of `variant` (plain or an Opacus mode) on a fixed random batch."""
    torch.manual_seed(0)
    model = build_model(case.model, case.num_features, case.num_classes).to(device)
    features = torch.randn(case.batch_size, case.num_features, device=device)
    labels = torch.randint(0, case.num_classes, (case.batch_size,), device=device).float()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def plain_backward(x: torch.Tensor, y: torch.Tensor) -> None:
        ClassifierLoss()(model(x), y).backward()

    backward: Callable[[torch.Tensor, torch.Tensor], object] = plain_backward

    if variant != PLAIN:
        dataset = torch.utils.data.TensorDataset(features, labels)
        loader = torch.utils.data.DataLoader(dataset, batch_size=case.batch_size)
        private = make_private(
            privacy_engine(),
            model,
            ClassifierLoss(reduction="none"),
            optimizer,
            loader,
            NOISE_MULTIPLIER,
            MAX_GRAD_NORM,
            variant,
            poisson_sampling=False,  # a fixed batch size, so every variant does equal work
            seed=0,
        )
        optimizer, backward = private.optimizer, private.backward

    def step() -> None:
        optimizer.zero_grad()
        backward(features, labels)
        optimizer.step()

    return step


def time_steps(step: Step, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` consecutive steps."""
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return (time.perf_counter() - started) / steps


def peak_step_memory(step: Step, device: torch.device) -> float:
    """MiB one step needs above the resting state (NaN where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resting = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - resting) / 2**20
    if not Path("/proc/self/clear_refs").exists():
        return float("nan")
    _return_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark to now
    resting = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - resting) / 1024


def measure(
    case: Case, device: torch.device, warmup: int, repeats: int, seconds: float
) -> list[dict]:
    """Rows of one case: every variant's median step time, ratio to plain, peak memory.

    Each timing runs as many consecutive steps as fit in about `seconds` (at least one).
    """
    step_of = {PLAIN: make_step(case, PLAIN, device)}
    for mode in GRAD_SAMPLE_MODES:
        try:
            step_of[mode] = make_step(case, mode, device)
        except ConfigError:  # a mode this model cannot use (fused: Linear layers only)
            continue
    variants = list(step_of)
    steps_of = {}
    for variant, step in step_of.items():
        for _ in range(warmup):
            step()
        steps_of[variant] = max(1, min(MAX_STEPS, round(seconds / time_steps(step, 1, device))))
    timings: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant, step in step_of.items():
            timings[variant].append(time_steps(step, steps_of[variant], device))
    plain = statistics.median(timings[PLAIN])
    chosen = grad_sample_mode(case.model, device.type)
    return [
        {
            "device": str(device),
            "model": case.model,
            "features": case.num_features,
            "batch": case.batch_size,
            "variant": variant,
            "chosen": variant == chosen,
            "ms_per_step": round(statistics.median(timings[variant]) * 1000, 4),
            "ratio_to_plain": round(statistics.median(timings[variant]) / plain, 3),
            "peak_mib": round(peak_step_memory(step_of[variant], device), 2),
        }
        for variant in variants
    ]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _return_freed_memory() -> None:
    """Give freed heap pages back to the OS, so the next step's peak starts from rest."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _map_large_allocations_separately() -> None:
    """glibc: allocations of 64 KiB and more get their own mappings, freed to the OS at
    once; otherwise a step could reuse heap a previous variant freed and look free."""
    libc = _libc()
    if libc is not None:
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 64 * 1024)


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<7}{'batch':>6}  {'variant':<10}{'ms/step':>9}{'x plain':>9}{'peak MiB':>10}")
    for row in rows:
        mark = " *" if row["chosen"] else ""
        print(
            f"{row['model']:<7}{row['batch']:>6}  {row['variant']:<10}{row['ms_per_step']:>9.3f}"
            f"{row['ratio_to_plain']:>9.2f}{row['peak_mib']:>10.2f}{mark}"
        )
    print("* the mode FedModel trains this model with (fedmodel.dp_modes)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="batch 64 only, fewer repeats")
    parser.add_argument("--csv", type=Path, default=Path("dp_overhead.csv"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here; use --device cpu")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    _map_large_allocations_separately()
    warmup, repeats, seconds = (3, 5, 0.03) if args.quick else (5, 9, 0.1)
    print(
        f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"torch {torch.__version__}, {args.threads} CPU thread(s); median of {repeats} "
        f"timings of ~{seconds * 1000:.0f} ms of steps each, after {warmup} warm-up steps"
    )
    rows: list[dict] = []
    for case in cases(device, args.quick):
        rows += measure(case, device, warmup, repeats, seconds)
    print_table(rows)
    write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
