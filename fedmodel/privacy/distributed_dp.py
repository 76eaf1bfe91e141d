"""The distributed discrete Gaussian mechanism: what clients send, what the server decodes.

Kairouz, Liu and Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation" (DDG). Each client clips its update in L2, rotates it
with a randomized Hadamard transform (so no coordinate carries much of its norm), scales
it by 1/gamma, rounds it stochastically to integers (again until its norm is within
`rounded_norm_bound`: the paper's conditional rounding), adds discrete Gaussian noise of
its own and reduces it modulo 2**bits. Secure aggregation sums the residues modulo
2**bits and reveals only that sum; the server maps it to the centred range, unscales and
rotates back. The sum of the surviving clients' noise is what protects each client, from
the server too (accounting: fedmodel.privacy.distributed_accounting).

Wrap-around costs utility, not privacy (the residue is a function of the noisy sum):
`plan_granularity` chooses gamma so that the probability that any coordinate of the sum
leaves the centred range is below a target, by the sub-Gaussian tail bound stated in
`overflow_probability_bound`.

The rotation's signs come from a seed all clients of a round share; it is public, and
must be drawn independently of the updates (the overflow bound needs it, privacy does
not). Randomness for rounding and noise comes from the caller's generator
(fedmodel.sampling.dp_numpy_generator: the OS CSPRNG on a deployed node).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedmodel.errors import ConfigError
from fedmodel.privacy.discrete_gaussian import sample_discrete_gaussian

DEFAULT_BETA = math.exp(-0.5)  # conditional rounding's rejection bound, TFF's default
MAX_BITS = 32  # Flower's SecAgg+ modulus is at most 2**32
MIN_INTEGER_STDDEV = 0.5  # the DDG privacy theorem needs sigma >= 1/2 per client
MAX_ROUNDING_TRIES = 1000  # each try fails with probability <= beta


def padded_dimension(dimension: int) -> int:
    """The Hadamard transform's length: the next power of two."""
    return 1 << max(dimension - 1, 0).bit_length()


def rounded_norm_bound(scaled_clip_norm: float, beta: float, dimension: int) -> float:
    """L2 norm bound on a client's rounded vector: its sensitivity in the integer domain.

    DDG's conditional randomized rounding: stochastic rounding of a vector of norm <= c
    moves it by less than sqrt(d), and its squared norm exceeds
    c^2 + d/4 + sqrt(2 log(1/beta)) (c + sqrt(d)/2) with probability <= beta, so rounding
    again until it does not (beta > 0) bounds the norm by the smaller of the two.
    """
    deterministic = scaled_clip_norm + math.sqrt(dimension)
    if beta == 0:
        return deterministic
    squared = (
        scaled_clip_norm**2
        + dimension / 4
        + math.sqrt(2 * math.log(1 / beta)) * (scaled_clip_norm + math.sqrt(dimension) / 2)
    )
    return min(deterministic, math.sqrt(squared))


@dataclass(frozen=True)
class DistributedDpParameters:
    """What every client of a round encodes with; public, and all the accountant needs."""

    clip_norm: float  # L2, in model units
    local_stddev: float  # each client's noise, in model units
    granularity: float  # gamma: one integer step, in model units
    bits: int  # residues modulo 2**bits
    dimension: int  # the update's length, before padding
    beta: float = DEFAULT_BETA

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= MAX_BITS:
            raise ConfigError(f"distributed DP bits must be in 1..{MAX_BITS}, got {self.bits}")
        if self.clip_norm <= 0 or self.granularity <= 0 or self.dimension < 1:
            raise ConfigError(
                "distributed DP needs a clip norm, granularity and dimension above 0, got "
                f"{self.clip_norm}, {self.granularity}, {self.dimension}"
            )
        if not 0 <= self.beta < 1:
            raise ConfigError(f"distributed DP beta must be in [0, 1), got {self.beta}")
        if self.integer_stddev < MIN_INTEGER_STDDEV:
            raise ConfigError(
                f"distributed DP noise {self.local_stddev:g} is {self.integer_stddev:.3g} "
                f"integer steps of {self.granularity:g}; the DDG bound needs at least "
                f"{MIN_INTEGER_STDDEV}: raise the noise or the bits"
            )

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def padded_dimension(self) -> int:
        return padded_dimension(self.dimension)

    @property
    def integer_stddev(self) -> float:
        """Each client's discrete Gaussian sigma, in integer steps."""
        return self.local_stddev / self.granularity

    @property
    def norm_bound(self) -> float:
        """The bound conditional rounding enforces (`rounded_norm_bound`)."""
        return rounded_norm_bound(
            self.clip_norm / self.granularity, self.beta, self.padded_dimension
        )


def overflow_probability_bound(parameters: DistributedDpParameters, clients: int) -> float:
    """P(some coordinate of `clients` clients' sum leaves [-m/2, m/2)), m = 2**bits.

    Coordinate j of the sum is S_j = U_j + R_j + Z_j in integer steps: U_j, coordinate j of
    the rotated sum of clipped updates (norm <= n c), is a Rademacher sum, n^2 c^2 / (d
    gamma^2) sub-Gaussian over the random signs (Hoeffding); Z_j, the sum of n discrete
    Gaussians, is n sigma^2 / gamma^2 sub-Gaussian (Canonne et al. 2020); the
    rounding R_j is below n in magnitude. With v the sum of the two variance proxies,
    P(|S_j| >= m/2) <= 2 exp(-(m/2 - n)^2 / (2 v)); a union bound over the d padded
    coordinates gives the result, capped at 1.
    """
    dimension = parameters.padded_dimension
    margin = parameters.modulus / 2 - clients
    if margin <= 0:
        return 1.0
    proxy = (
        clients**2 * parameters.clip_norm**2 / dimension + clients * parameters.local_stddev**2
    ) / parameters.granularity**2
    return min(1.0, 2 * dimension * math.exp(-(margin**2) / (2 * proxy)))


def plan_granularity(
    clip_norm: float,
    local_stddev: float,
    bits: int,
    clients: int,
    dimension: int,
    overflow_probability: float = 1e-6,
    beta: float = DEFAULT_BETA,
) -> DistributedDpParameters:
    """The finest gamma for which `overflow_probability_bound` is at most the target.

    Solves 2 d exp(-(m/2 - n)^2 gamma^2 / (2 (n^2 c^2 / d + n sigma^2))) = p for gamma:
    finer steps round less but need more room for the same tails. Fewer clients than
    planned (drop-outs) only lower the bound.
    """
    if not 0 < overflow_probability < 1:
        raise ConfigError(
            f"distributed DP overflow probability must be in (0, 1), got {overflow_probability}"
        )
    modulus = 1 << bits
    if modulus / 2 <= clients:
        raise ConfigError(
            f"distributed DP with {bits} bits cannot sum {clients} clients: raise the bits"
        )
    dimension_padded = padded_dimension(dimension)
    spread = clients**2 * clip_norm**2 / dimension_padded + clients * local_stddev**2
    granularity = math.sqrt(2 * math.log(2 * dimension_padded / overflow_probability) * spread) / (
        modulus / 2 - clients
    )
    return DistributedDpParameters(clip_norm, local_stddev, granularity, bits, dimension, beta)


def _hadamard(vector: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform (its own inverse), O(d log d)."""
    length = vector.shape[0]
    result = vector.astype(np.float64)
    half = 1
    while half < length:
        blocks = result.reshape(-1, 2, half)
        result = np.stack((blocks[:, 0] + blocks[:, 1], blocks[:, 0] - blocks[:, 1]), axis=1)
        half *= 2
    return result.reshape(length) / math.sqrt(length)


def _signs(rotation_seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(rotation_seed).integers(0, 2, length) * 2.0 - 1.0


def rotate(vector: np.ndarray, rotation_seed: int) -> np.ndarray:
    """H D x / sqrt(d) of `vector` zero-padded to a power of two; D the seed's signs."""
    padded = np.zeros(padded_dimension(vector.shape[0]))
    padded[: vector.shape[0]] = vector
    return _hadamard(padded * _signs(rotation_seed, padded.shape[0]))


def unrotate(rotated: np.ndarray, rotation_seed: int, dimension: int) -> np.ndarray:
    """Inverse of `rotate`, cut back to `dimension`."""
    return (_hadamard(rotated) * _signs(rotation_seed, rotated.shape[0]))[:dimension]


def clip(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """`update` scaled down to L2 norm `clip_norm` if above it."""
    norm = float(np.linalg.norm(update))
    return update * min(1.0, clip_norm / norm) if norm > 0 else update.astype(np.float64)


def conditional_round(
    scaled: np.ndarray, norm_bound: float, generator: np.random.Generator
) -> np.ndarray:
    """Unbiased stochastic rounding to integers, redrawn until the L2 norm <= `norm_bound`."""
    floor = np.floor(scaled)
    fraction = scaled - floor
    for _ in range(MAX_ROUNDING_TRIES):
        rounded = floor + (generator.random(scaled.shape) < fraction)
        if np.linalg.norm(rounded) <= norm_bound:
            return rounded.astype(np.int64)
    raise RuntimeError(
        f"conditional rounding failed {MAX_ROUNDING_TRIES} times: the norm bound is wrong"
    )


def quantize(
    update: np.ndarray,
    parameters: DistributedDpParameters,
    rotation_seed: int,
    generator: np.random.Generator,
) -> np.ndarray:
    """A client's integer vector before noise: clipped, rotated, scaled, rounded."""
    if update.shape != (parameters.dimension,):
        raise ValueError(
            f"expected an update of shape ({parameters.dimension},), got {update.shape}"
        )
    if not np.isfinite(update).all():
        raise ValueError("a non-finite update cannot be clipped or encoded")
    rotated = rotate(clip(update, parameters.clip_norm), rotation_seed)
    return conditional_round(rotated / parameters.granularity, parameters.norm_bound, generator)


def encode(
    update: np.ndarray,
    parameters: DistributedDpParameters,
    rotation_seed: int,
    generator: np.random.Generator,
) -> np.ndarray:
    """A client's residues in [0, 2**bits): `quantize`, add its noise, reduce."""
    rounded = quantize(update, parameters, rotation_seed, generator)
    noise = sample_discrete_gaussian(parameters.integer_stddev, rounded.shape[0], generator)
    return np.mod(rounded + noise, parameters.modulus)


def modular_sum(residues: Sequence[np.ndarray], modulus: int) -> np.ndarray:
    """What secure aggregation reveals: the residues' sum modulo `modulus`."""
    total = np.zeros_like(residues[0])
    for vector in residues:
        total = np.mod(total + vector, modulus)
    return total


def decode(
    summed: np.ndarray, parameters: DistributedDpParameters, rotation_seed: int
) -> np.ndarray:
    """The noisy sum of clipped updates, in model units, from the modular sum.

    Exactly sum(clipped) + gamma R^T (sum of rounding errors + sum of noise), R the
    rotation, whenever no coordinate overflowed (`overflow_probability_bound`).
    """
    modulus = parameters.modulus
    centred = np.where(summed >= modulus // 2, summed - modulus, summed).astype(np.float64)
    return unrotate(centred * parameters.granularity, rotation_seed, parameters.dimension)


def rounding_error_bound(parameters: DistributedDpParameters, clients: int) -> float:
    """L2 bound on |decode(modular sum of `quantize`d updates) - sum(clipped)|, no overflow:
    each client's rounding moves each of the d padded coordinates by less than one step,
    and the rotation keeps norms, so gamma n sqrt(d). Noise adds gamma R^T (its sum)."""
    return parameters.granularity * clients * math.sqrt(parameters.padded_dimension)
