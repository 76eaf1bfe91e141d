"""DP-SGD's random parts run as planned and accounted: Poisson batches at exactly the
rate the accountant records, L of them per epoch, every one (empty or not) a noisy step,
all drawn from generators the caller seeds rather than from torch's global RNG."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmodel.dp_modes import GRAD_SAMPLE_MODES
from fedmodel.models import ClassifierLoss, build_model
from fedmodel.sampling import PoissonBatchSampler, dp_generators, poisson_loader, poisson_plan
from fedmodel.training import train_dp

LOSS = ClassifierLoss(reduction="none")

CPU = torch.device("cpu")


def _data(rows: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, 8, generator=generator)
    return TensorDataset(features, torch.randint(0, 2, (rows,), generator=generator).float())


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _model() -> torch.nn.Module:
    """The same start for every call, whatever torch's global RNG holds."""
    model = build_model("mlp", 8)
    with torch.no_grad():
        for index, parameter in enumerate(model.parameters()):
            parameter.copy_(torch.linspace(-0.5, 0.5, parameter.numel()).view_as(parameter))
            parameter.mul_((-1) ** index)
    return model


def _train(
    data: TensorDataset, batch_size: int, mode: str, seed: int | None, epochs: int = 1
) -> tuple[torch.Tensor, list]:
    model = _model()
    loader = DataLoader(data, batch_size=batch_size)
    result = train_dp(
        model, LOSS, loader, epochs, 0.5, 1.1, 1.0, [], CPU, grad_sample_mode=mode, seed=seed
    )
    return _weights(model), result.history


def test_the_plan_is_exactly_what_the_sampler_and_opacus_run_for_every_length_up_to_10000() -> None:
    generator = torch.Generator()
    opacus_short = []  # where Opacus's DPDataLoader runs int(1 / (1 / L)) = L - 1 batches
    for steps in range(1, 10_001):
        for batch_size, rows in ((1, steps), (7, 7 * steps), (7, 7 * steps - 6)):
            plan = poisson_plan(rows, batch_size)
            sampler = PoissonBatchSampler(rows, batch_size, generator)
            assert (plan.sample_rate, plan.steps_per_epoch) == (1 / steps, steps)
            assert (sampler.sample_rate, len(sampler)) == (plan.sample_rate, steps)
            # what Opacus's make_private records: 1 / len(loader)
            assert 1 / len(sampler) == sampler.sample_rate
        if int(1 / (1 / steps)) != steps:
            opacus_short.append(steps)
    assert {93, 99} <= set(opacus_short)


@pytest.mark.parametrize("steps", [1, 2, 93, 99])
def test_an_epoch_yields_exactly_its_planned_batches(steps: int) -> None:
    loader = poisson_loader(DataLoader(_data(3 * steps), batch_size=3), torch.Generator())
    assert sum(1 for _ in loader) == steps == len(loader)


@pytest.mark.parametrize("mode", ["hooks", "fused"])
@pytest.mark.parametrize(("steps", "epochs"), [(1, 3), (93, 1), (99, 1)])
def test_the_accountant_records_the_planned_rate_and_epochs_times_l_steps(
    mode: str, steps: int, epochs: int
) -> None:
    rows, batch_size = 2 * steps - 1, 2  # ceil(rows / 2) = steps
    _, history = _train(_data(rows), batch_size, mode, seed=1, epochs=epochs)
    plan = poisson_plan(rows, batch_size)
    assert history == [(1.1, plan.sample_rate, epochs * plan.steps_per_epoch)]
    assert plan.sample_rate == 1 / steps


def _seed_with_only_empty_batches(rows: int) -> int:
    """A seed whose first epoch draws no row at all (rows steps at rate 1/rows)."""
    for seed in range(10_000):
        _, sampling = dp_generators(seed, CPU)
        if not any(PoissonBatchSampler(rows, 1, sampling)):
            return seed
    raise AssertionError("no such seed")


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_an_epoch_of_empty_batches_still_takes_noisy_accounted_steps(mode: str) -> None:
    rows = 3
    seed = _seed_with_only_empty_batches(rows)
    start = _weights(_model())
    weights, history = _train(_data(rows), 1, mode, seed=seed)
    assert history == [(1.1, 1 / rows, rows)]
    assert torch.isfinite(weights).all()
    # only noise moved the weights: lr 0.5 * N(0, 1.1^2) per step / expected batch 1
    noise, _ = dp_generators(seed, CPU)
    draws: list[torch.Tensor] = []
    for _ in range(rows):
        for parameter_shape in (p.shape for p in _model().parameters()):
            draws.append(torch.normal(0.0, 1.1, parameter_shape, generator=noise).flatten())
    steps = torch.stack(torch.cat(draws).split(len(start)))
    torch.testing.assert_close(start - weights, 0.5 * steps.sum(0))


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_a_seed_fixes_the_run_and_torchs_global_rng_plays_no_part(mode: str) -> None:
    data = _data(90)
    torch.manual_seed(0)
    first, _ = _train(data, 16, mode, seed=7)
    model, loader = _model(), DataLoader(data, batch_size=16)
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    train_dp(model, LOSS, loader, 1, 0.5, 1.1, 1.0, [], CPU, grad_sample_mode=mode, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # not even drawn from
    assert torch.equal(_weights(model), first)
    other, _ = _train(data, 16, mode, seed=8)
    assert not torch.equal(first, other)


def test_without_a_seed_every_run_draws_fresh_noise() -> None:
    data = _data(90)
    first, _ = _train(data, 16, "fused", seed=None)
    second, _ = _train(data, 16, "fused", seed=None)
    assert not torch.equal(first, second)


def test_the_sampler_includes_each_row_at_its_rate() -> None:
    sampler = PoissonBatchSampler(1000, 100, torch.Generator().manual_seed(3))  # q = 1/10
    sizes = [len(batch) for _ in range(20) for batch in sampler]
    mean, spread = sum(sizes) / len(sizes), math.sqrt(1000 * 0.1 * 0.9 / len(sizes))
    assert abs(mean - 100) < 5 * spread
