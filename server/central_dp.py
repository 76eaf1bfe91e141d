"""Client-level (central) DP on the coordinator: clip each client's update, noise the mean.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): every client's update (its model minus the global model) is clipped to an L2
norm C, the clipped updates are summed and divided by the planned cohort size n, and
Gaussian noise of standard deviation z * C / n is added. Fixed clipping is Flower's
server-side wrapper; adaptive clipping (Andrew et al. 2021) is Flower's wrapper with its
aggregation step rewritten (see `CentralAdaptiveClipping`). Both account every release
in the run's federation ledger (fedmodel.privacy.central) and stop the run cleanly, via
`FederationStopped`, before a round that would exceed the client-level budget; Flower's
own accountant and its `PrivacyBudgetExhausted` are not used.

The wrappers sit inside `GuardedStrategy`, so they see only replies that passed
validation; the aggregation rule under them is `FixedCohortMean`.

The noise (on the mean and, with adaptive clipping, on the count) is drawn from a
generator seeded from the OS CSPRNG for each release and kept nowhere, not from NumPy's
global generator as Flower's wrappers draw it: that one is saved in `latest.pt` and
restored on resume (so that node sampling replays), so a resumed round would draw the
same noise and anyone reading the checkpoint could regenerate it and subtract it from the
released model. This holds in simulation too: a central-DP run's models are not
reproducible from its seed, its node sampling still is.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.supercore.differential_privacy import adaptive_clip_inputs_inplace, compute_stdv

from fedmodel.config import RunConfig
from fedmodel.privacy.central import CentralBudgetStop, CentralRelease, FederationLedger
from server.run_record import RunRecorder
from server.strategy import FederationStopped
from server.wrapping import WrappingStrategy


class FixedCohortMean(WrappingStrategy):
    """global + (sum of client updates) / n, with n the planned cohort size.

    The fixed-denominator estimator of DP-FedAvg: a missing client counts as a zero
    update, and no client weighs more than another, so adding or removing one client
    moves the result by at most C / n - the sensitivity the noise is calibrated to.
    (FedAvg's example-weighted mean over the replies that came would not bound it.)
    Sampling, evaluation and metrics are the wrapped FedAvg's.
    """

    inner: FedAvg

    def __init__(self, inner: FedAvg, cohort_size: int) -> None:
        super().__init__(inner)
        self.cohort_size = cohort_size
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [reply for reply in replies if not reply.has_error()]
        if not valid or self._global is None:
            return None, None
        current = {key: array.numpy() for key, array in self._global.items()}
        total = {key: np.zeros_like(value) for key, value in current.items()}
        for reply in valid:
            (record,) = reply.content.array_records.values()
            for key, array in record.items():
                total[key] += array.numpy() - current[key]
        mean = ArrayRecord(
            {key: Array(current[key] + total[key] / self.cohort_size) for key in current}
        )
        contents = [reply.content for reply in valid]
        return mean, self.inner.train_metrics_aggr_fn(contents, self.inner.weighted_by_key)


class CentralAccounting:
    """Budget check before each round; ledger entry and run record at each release."""

    def __init__(self, ledger: FederationLedger, recorder: RunRecorder, sample_rate: float):
        self.ledger = ledger
        self.recorder = recorder
        self.sample_rate = sample_rate
        self._planned: CentralRelease | None = None

    def begin(
        self, server_round: int, noise_multiplier: float, count_stddev: float, clip: float
    ) -> None:
        """Project epsilon after this round's release; stop the run if it is over budget."""
        release = CentralRelease(
            server_round, noise_multiplier, count_stddev, clip, self.sample_rate
        )
        try:
            self.ledger.check(release)
        except CentralBudgetStop as stop:
            raise FederationStopped(str(stop)) from None
        self._planned = release

    def release(self) -> None:
        """The noisy aggregate is about to leave the server: ledger it and record epsilon."""
        if self._planned is None:
            raise RuntimeError("a central-DP release without a budget check")
        release, self._planned = self._planned, None
        try:
            epsilon = self.ledger.record(release)
        except CentralBudgetStop as stop:  # only if the ledger changed since the check
            raise FederationStopped(str(stop)) from None
        self.recorder.record_central_release(release, epsilon)


def secret_generator() -> np.random.Generator:
    """A generator no checkpoint, log or seed can reproduce: 128 bits from `secrets`."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


class SecretNoise:
    """Flower's noise step for its DP wrappers (std z * C / n), drawn from `secret_generator`.

    Flower 1.39 adds the noise with `add_gaussian_noise_inplace`, which draws from NumPy's
    global generator; this overrides that one method and changes nothing else, so the
    mechanism (and what is accounted) is the same.
    """

    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        stddev = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        generator = secret_generator()
        noisy = {}
        for key, array in aggregated.items():
            values = array.numpy()
            noisy[key] = Array(
                values + generator.normal(0.0, stddev, values.shape).astype(values.dtype)
            )
        return ArrayRecord(noisy)


class CentralFixedClipping(SecretNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, accounted in the federation ledger."""

    def __init__(
        self,
        strategy: FixedCohortMean,
        noise_multiplier: float,
        clipping_norm: float,
        accounting: CentralAccounting,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, strategy.cohort_size)
        self.accounting = accounting

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.accounting.begin(server_round, self.noise_multiplier, 0.0, self.clipping_norm)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.accounting.release()
        return arrays, metrics


class CentralAdaptiveClipping(SecretNoise, DifferentialPrivacyServerSideAdaptiveClipping):
    """Adaptive clipping as Andrew et al. 2021 (Algorithm 1) specify it.

    Flower 1.39's wrapper is used for its parameters (the update noise that, with the
    count noise, gives the requested effective noise multiplier); its noise is
    `SecretNoise`'s, and its aggregation step is replaced because it (1) updates the norm
    before adding noise, so the noise is scaled to the next round's norm rather than the
    one the updates were clipped to, (2) moves the norm down when too many updates are
    clipped (the opposite of tracking a quantile) and (3) releases the raw clipped count
    over the replies that came, whose sensitivity is 1, not the centred count over n
    (sensitivity 1/2) that the effective-noise formula assumes. Here the norm of round t
    clips and scales the noise of round t, the released count is
    sum(unclipped - 1/2) + N(0, sigma_count^2), and
    C <- C * exp(-lr * (unclipped fraction - target quantile)).
    """

    def __init__(
        self,
        strategy: FixedCohortMean,
        noise_multiplier: float,
        accounting: CentralAccounting,
        initial_clipping_norm: float,
        target_quantile: float,
        clip_norm_lr: float,
        clipped_count_stddev: float,
    ) -> None:
        super().__init__(
            strategy,
            noise_multiplier,
            strategy.cohort_size,
            initial_clipping_norm=initial_clipping_norm,
            target_clipped_quantile=1.0 - target_quantile,
            clip_norm_lr=clip_norm_lr,
            clipped_count_stddev=clipped_count_stddev,
        )
        self.target_quantile = target_quantile
        self.accounting = accounting

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.accounting.begin(
            server_round, self.noise_multiplier, self.clipped_count_stddev, self.clipping_norm
        )
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not validate_replies(replies, self.num_sampled_clients):
            return None, None
        current = self.current_arrays.to_numpy_ndarrays()
        unclipped = 0
        for reply in replies:
            for name, record in reply.content.array_records.items():
                update = [
                    np.subtract(x, g)
                    for x, g in zip(record.to_numpy_ndarrays(), current, strict=True)
                ]
                unclipped += not adaptive_clip_inputs_inplace(update, self.clipping_norm)
                reply.content[name] = ArrayRecord(
                    {
                        key: Array(np.asarray(g + u))
                        for key, g, u in zip(record.keys(), current, update, strict=True)
                    }
                )
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        arrays = self._add_noise_to_aggregated_arrays(arrays)  # z_update * this round's C / n
        self.accounting.release()
        count_noise = secret_generator().normal(0.0, self.clipped_count_stddev)
        centred = unclipped - len(replies) / 2 + count_noise
        fraction = float(centred) / self.num_sampled_clients + 0.5
        self.clipping_norm *= math.exp(-self.clip_norm_lr * (fraction - self.target_quantile))
        return arrays, metrics


def with_central_dp(inner: FedAvg, config: RunConfig, recorder: RunRecorder) -> Strategy:
    """`inner` under client-level DP (fixed or adaptive clipping) when `config.dp` asks for it."""
    if not config.client_dp:
        return inner
    cohort = config.clients_per_round
    run_dir = Path(config.output_dir).absolute()
    run_id = config.run_uid or run_dir.name  # the owners' ledgers key runs the same way
    ledger = FederationLedger(run_dir, run_id, config.delta, config.central_epsilon or None)
    accounting = CentralAccounting(ledger, recorder, cohort / config.clients)
    mean = FixedCohortMean(inner, cohort)
    if not config.central_adaptive:
        return CentralFixedClipping(
            mean, config.central_noise, config.central_clipping_norm, accounting
        )
    return CentralAdaptiveClipping(
        mean,
        config.central_noise,
        accounting,
        initial_clipping_norm=config.central_clipping_norm,
        target_quantile=config.central_target_quantile,
        clip_norm_lr=config.central_clip_lr,
        clipped_count_stddev=config.central_count_stddev_or_default,
    )
