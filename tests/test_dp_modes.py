"""Every Opacus grad-sample mode FedModel may train with computes the DP-SGD update of
Abadi et al. 2016 exactly: checked against per-sample gradients taken one sample at a
time, for every registered model, with the accounting unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmodel.dp_modes import FASTEST_MODE, GRAD_SAMPLE_MODES, grad_sample_mode
from fedmodel.errors import ConfigError
from fedmodel.models import MODELS, ClassifierLoss, build_model
from fedmodel.training import train_dp

LOSS = ClassifierLoss(reduction="none")

INPUTS = {"mlp": (8, 2), "logreg": (8, 2), "cnn": (784, 10)}  # features, classes
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROWS = 12


def _batch(model: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    features, classes = INPUTS[model]
    generator = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(ROWS, features, generator=generator)
    y = torch.randint(0, classes, (ROWS,), generator=generator).float()
    return x.to(device), y.to(device)


def _per_sample_gradients(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[list[torch.Tensor]]:
    """Each sample's gradient from its own single-sample backward pass."""
    gradients = []
    for i in range(len(y)):
        model.zero_grad()
        ClassifierLoss()(model(x[i : i + 1]), y[i : i + 1]).backward()
        gradients.append([p.grad.detach().clone() for p in model.parameters()])  # type: ignore[union-attr]
    model.zero_grad()
    return gradients


def _clipped_mean(gradients: list[list[torch.Tensor]], max_norm: float) -> list[torch.Tensor]:
    """Opacus's flat clipping: factor C / (norm + 1e-6) capped at 1, then the batch mean."""
    total = [torch.zeros_like(g) for g in gradients[0]]
    for sample in gradients:
        norm = torch.sqrt(sum((g**2).sum() for g in sample))  # type: ignore[arg-type]
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        total = [t + factor * g for t, g in zip(total, sample, strict=True)]
    return [t / len(gradients) for t in total]


def _norms(gradients: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.sqrt(sum((g**2).sum() for g in s)) for s in gradients])  # type: ignore[misc]


def test_every_registered_model_has_a_measured_mode() -> None:
    assert {model for model, _ in FASTEST_MODE} == set(MODELS)
    assert set(FASTEST_MODE.values()) <= set(GRAD_SAMPLE_MODES)
    assert grad_sample_mode("mlp") == FASTEST_MODE[("mlp", "cpu")]


@pytest.fixture(autouse=True)
def exact_float32_convolutions() -> Iterator[None]:
    """cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa): fine for
    training, too coarse to compare two ways of computing the same gradient."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


USABLE = [  # fused: Linear layers only
    (name, mode) for name in sorted(MODELS) for mode in GRAD_SAMPLE_MODES
    if not (mode == "fused" and name == "cnn")
]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "mode"), USABLE)
def test_each_mode_gives_the_clipped_per_sample_update(name: str, mode: str, device: str) -> None:
    torch.manual_seed(0)
    features, classes = INPUTS[name]
    model = build_model(name, features, classes).to(device)
    x, y = _batch(name, device)
    gradients = _per_sample_gradients(model, x, y)
    max_grad_norm = float(_norms(gradients).median())  # half the samples are clipped
    expected = _clipped_mean(gradients, max_grad_norm)
    before = [p.detach().clone() for p in model.parameters()]
    # One batch holding every row (sample rate 1), no noise, lr 1: the step is the update.
    loader = DataLoader(TensorDataset(x, y), batch_size=ROWS)
    result = train_dp(
        model,
        LOSS,
        loader,
        1,
        1.0,
        0.0,
        max_grad_norm,
        [],
        torch.device(device),
        grad_sample_mode=mode,
    )
    update = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
    for got, want in zip(update, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert result.history == [(0.0, 1.0, 1)]


def test_modes_agree_under_poisson_sampling_and_account_alike() -> None:
    """Same seed, same Poisson batches (of varying size), same noise: every mode must
    end with the same weights and record the same (noise, sample rate, steps)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(200, 8, generator=generator)
    y = torch.randint(0, 2, (200,), generator=generator).float()
    histories, weights = set(), []
    for mode in GRAD_SAMPLE_MODES:
        torch.manual_seed(0)
        model = build_model("mlp", 8)
        loader = DataLoader(TensorDataset(x, y), batch_size=32)  # 7 batches: q = 1/7
        result = train_dp(
            model, LOSS, loader, 2, 0.5, 1.1, 1.0, [], torch.device("cpu"), 0.0, mode, seed=0
        )
        histories.add(tuple(result.history))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert histories == {((1.1, 1 / 7, 14),)}
    for other in weights[1:]:
        torch.testing.assert_close(other, weights[0], rtol=1e-4, atol=1e-5)


def test_fused_mode_refuses_a_model_with_other_layers() -> None:
    loader = DataLoader(TensorDataset(*_batch("cnn", "cpu")), batch_size=4)
    with pytest.raises(ConfigError, match="only trainable layers are nn.Linear"):
        train_dp(build_model("cnn", 784, 10), LOSS, loader, 1, 0.1, 1.0, 1.0, [],
                 torch.device("cpu"), grad_sample_mode="fused")  # fmt: skip
