"""Poisson subsampling for DP-SGD, and the seeded generators of its two random draws.

DP-SGD's privacy amplification by subsampling (Abadi et al. 2016; Mironov, Talwar and
Zhang 2019 for the RDP bound the accountant uses) assumes that each step's batch
includes every row independently with the probability q the accountant records. Opacus's
DPDataLoader records q = 1/L (L = ceil(rows / batch size)) but runs int(1/q) batches per
epoch, which float arithmetic makes L - 1 for some L (93, 99, ...). `PoissonBatchSampler`
runs exactly the plan `poisson_plan` announces: L batches per epoch at rate exactly 1/L,
the same float the accountant then records, so a ledger written ahead from the plan
describes the mechanism that ran.

Randomness: the rows each step includes and the noise it adds come from two
torch.Generator objects seeded from one caller-chosen seed (`dp_generators`), never from
torch's global generator. These are torch's Mersenne Twister (CPU) and Philox (CUDA)
streams, not a cryptographically secure generator: Opacus's secure_mode needs
torchcsprng, which has no torch 2.x build. The noise is unpredictable to others exactly
as long as the seed is, so a deployed node must draw it from the OS (`secrets`).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


@dataclass(frozen=True)
class PoissonPlan:
    """What Poisson sampling will run for one dataset: the accountant's q and steps."""

    sample_rate: float
    steps_per_epoch: int


def poisson_plan(rows: int, batch_size: int) -> PoissonPlan:
    """q = 1/L and L steps per epoch, L = ceil(rows / batch_size) (expected batch <= batch_size).

    The one place this arithmetic lives: `PoissonBatchSampler` runs this plan, so a
    client may account (or write a ledger entry) for a round before training it.
    """
    if rows < 1 or batch_size < 1:
        raise ValueError(
            f"Poisson sampling needs rows and a batch size >= 1, got {rows}, {batch_size}"
        )
    steps = math.ceil(rows / batch_size)
    return PoissonPlan(sample_rate=1 / steps, steps_per_epoch=steps)


MIN_STEPS_PER_EPOCH = 4
"""The fewest Poisson steps per epoch a small client takes (its expected batch: at most
a quarter of its rows); see `client_batch_size`."""


def client_batch_size(rows: int, batch_size: int) -> int:
    """The batch a client of `rows` training rows uses when `batch_size` is requested:
    min(batch_size, max(1, rows // 4)).

    Why: with fewer rows than a few batches, Poisson sampling at the requested size takes
    one or two steps per epoch at a sample rate near 1, which gives up the amplification
    by subsampling; the calibrated noise then drowns the few updates (4 sites of ~45 rows
    at batch 64: q = 1, noise multiplier 7). At most a quarter of its rows per batch, a
    small client takes at least `MIN_STEPS_PER_EPOCH` steps per epoch at q <= 1/4. Clients
    with 4 or more batches of rows keep `batch_size`; the plan and the accountant see the
    batch that runs (`poisson_plan(rows, client_batch_size(rows, batch_size))`).
    """
    return min(batch_size, max(1, rows // MIN_STEPS_PER_EPOCH))


class PoissonBatchSampler(Sampler[list[int]]):
    """Each epoch, `steps_per_epoch` batches, each holding every row independently with
    probability `sample_rate` (so a batch may be empty); masks come from `generator`.

    The uniforms are float64, so P(row included) exceeds `sample_rate` by less than
    2^-53 (float32 uniforms, as in Opacus's sampler, would round q to 24 bits).
    """

    def __init__(self, rows: int, batch_size: int, generator: torch.Generator) -> None:
        plan = poisson_plan(rows, batch_size)
        self.rows, self.generator = rows, generator
        self.sample_rate, self.steps_per_epoch = plan.sample_rate, plan.steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps_per_epoch):
            draws = torch.rand(self.rows, dtype=torch.float64, generator=self.generator)
            yield torch.nonzero(draws < self.sample_rate).flatten().tolist()


class _EmptyAwareCollate:
    """torch's default collation, plus zero-row tensors shaped like the dataset's
    (a dataset of tensor tuples) for an empty batch, whose shapes it cannot infer."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __call__(self, rows: list[Any]) -> Any:
        if rows:
            return default_collate(rows)
        return [tensor[:0] for tensor in default_collate([self.dataset[0]])]


def poisson_loader(loader: DataLoader[Any], generator: torch.Generator) -> DataLoader[Any]:
    """`loader`'s dataset, Poisson-sampled with the plan of its row count and batch size."""
    if loader.batch_size is None:
        raise ValueError("Poisson sampling needs a loader built with a batch_size")
    dataset = loader.dataset
    sampler = PoissonBatchSampler(len(dataset), loader.batch_size, generator)  # type: ignore[arg-type]
    # A loader draws a worker base seed (unused without workers) from its generator, from
    # torch's global RNG if it has none: a generator of its own keeps the global RNG out.
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_EmptyAwareCollate(dataset),
        generator=torch.Generator(),
    )


def dp_generators(
    seed: int | None, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """(noise, sampling) generators, seeded independently from `seed` (an int >= 0).

    `seed=None` draws a fresh seed from the OS CSPRNG (`secrets`), what a deployed node
    wants every round; a simulation passes one derived from its run seed to reproduce.
    The noise generator lives on `device`, where Opacus and the fused step draw the
    noise; the sampling generator on the CPU, where the masks are drawn. numpy's
    SeedSequence spreads one seed into two unrelated 64-bit seeds. Both are torch's
    generators (Mersenne Twister, Philox), not CSPRNGs: the noise is as unpredictable
    as the seed, no more.
    """
    if seed is None:
        seed = secrets.randbits(63)
    noise_seed, sampling_seed = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
    noise = torch.Generator(device=device).manual_seed(int(noise_seed))
    return noise, torch.Generator().manual_seed(int(sampling_seed))


def dp_numpy_generator(seed: int | None) -> np.random.Generator:
    """A NumPy generator for DP noise drawn on the CPU (distributed DP's integer noise).

    `seed=None` seeds it from the OS CSPRNG (`secrets`, 128 bits), what a deployed node
    wants every round; a simulation passes one derived from its run seed. PCG64 is not a
    CSPRNG either: as with `dp_generators`, the noise is as unpredictable as the seed.
    """
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed)
