"""A non-finite per-sample gradient cannot pass clipping in any DP-SGD mode.

The attacker is the coordinator: it ships a finite global model crafted so that one
target record's gradient overflows. Were that record's NaN to reach the update, the
reply would be NaN exactly when the record was sampled, a perfect membership signal.
Every mode must instead drop the sample's contribution (an update equal to the update
without it) and otherwise step as usual: noise added, step accounted, reply finite.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmodel.dp_modes import GRAD_SAMPLE_MODES
from fedmodel.models import MODELS, ClassifierLoss, build_model
from fedmodel.sampling import PoissonBatchSampler, dp_generators
from fedmodel.training import train_dp

LOSS = ClassifierLoss(reduction="none")

CPU = torch.device("cpu")
INPUTS = {"mlp": (8, 2), "logreg": (8, 2), "cnn": (784, 10)}  # features, classes
USABLE = [  # fused: Linear layers only
    (name, mode) for name in sorted(MODELS) for mode in GRAD_SAMPLE_MODES
    if not (mode == "fused" and name == "cnn")
]  # fmt: skip


def _rows(name: str, rows: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    features, classes = INPUTS[name]
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(rows, features, generator=generator)
    return x, torch.randint(0, classes, (rows,), generator=generator).float()


def _noised_sum(name: str, mode: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The step's clipped sum plus noise: one batch of every row (rate 1), lr 1, so the
    update times the expected batch size (the row count)."""
    torch.manual_seed(0)
    features, classes = INPUTS[name]
    model = build_model(name, features, classes)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    result = train_dp(model, LOSS, loader, 1, 1.0, 0.5, 1.0, [], CPU, grad_sample_mode=mode, seed=3)
    assert result.history == [(0.5, 1.0, 1)]
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return (before - after) * len(y)


@pytest.mark.parametrize(("name", "mode"), USABLE)
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_a_sample_with_a_nonfinite_gradient_contributes_exactly_nothing(
    name: str, mode: str, poison: float
) -> None:
    x, y = _rows(name)
    poisoned = x.clone()
    poisoned[0, : x.shape[1] // 2] = poison
    with_it = _noised_sum(name, mode, poisoned, y)
    without_it = _noised_sum(name, mode, x[1:], y[1:])
    assert torch.isfinite(with_it).all()
    torch.testing.assert_close(with_it, without_it, rtol=1e-4, atol=1e-5)


def _crafted_model() -> torch.nn.Module:
    """A finite MLP whose first hidden unit is 0 on every row but the target's (feature
    0 above 5) and overflows float32 two layers later on the target alone."""
    torch.manual_seed(1)
    model = build_model("mlp", 8)
    first, second, _ = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        first.weight[0] = 0.0
        first.weight[0, 0] = 1e30
        first.bias[0] = -5e30
        second.weight[:, 0] = 1e30
    return model


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_a_crafted_model_cannot_make_the_reply_nan_when_its_target_is_sampled(
    mode: str,
) -> None:
    x, y = _rows("mlp", 60)
    x[:, 0] = x[:, 0].clamp(max=3.0)
    x[17, 0] = 6.0  # the target record
    model = _crafted_model()
    losses = ClassifierLoss(reduction="none")(model(x), y)
    assert not losses[17].isfinite() and losses[torch.arange(60) != 17].isfinite().all()

    result = train_dp(
        model,
        LOSS, DataLoader(TensorDataset(x, y), batch_size=10), 3, 0.1, 1.0, 1.0, [], CPU,
        grad_sample_mode=mode, seed=5,
    )  # fmt: skip
    _, sampling = dp_generators(5, CPU)
    assert any(17 in batch for _ in range(3) for batch in PoissonBatchSampler(60, 10, sampling))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.history == [(1.0, 1 / 6, 18)]
    assert torch.isfinite(torch.tensor(result.loss))
