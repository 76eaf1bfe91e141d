"""Local training of a task's model: plain SGD, or DP-SGD with Opacus or the fused step.

The loss is the task's per-sample loss (fedmodel.task); each mode's backward pass on one
batch is in fedmodel.backward; a trained model is scored by fedmodel.evaluation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedmodel.backward import (
    BatchBackward,
    ReducibleLoss,
    ghost_backward,
    mean_loss_backward,
    per_sample_backward,
)
from fedmodel.errors import ConfigError
from fedmodel.privacy.accountant import ACCOUNTANT, Segment, merge_segments
from fedmodel.sampling import dp_generators, poisson_loader
from fedmodel.task import PerSampleLoss


@dataclass(frozen=True)
class TrainResult:
    """What one local training job produced, besides the updated model weights."""

    loss: float
    history: list[Segment] = field(default_factory=list)


def select_device(preference: str = "auto") -> torch.device:
    """`auto` picks the first CUDA device when there is one, else the CPU.

    Raises ConfigError when `cuda[:N]` is asked for and that device does not exist here.
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            found = f"only {count} CUDA device(s)" if count else "no CUDA device"
            raise ConfigError(
                f"--device {preference}: this machine has {found}; use --device auto or cpu"
            )
    return device


def train_plain(
    model: nn.Module,
    loss: PerSampleLoss,
    loader: DataLoader,
    epochs: int,
    lr: float,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Non-private SGD: the baseline DP-SGD is measured against.

    `proximal_mu` > 0 adds FedProx's proximal term (see `_ProximalTerm`).
    """
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    proximal = _ProximalTerm(model, proximal_mu, lr)
    backward = mean_loss_backward(model, loss)
    return TrainResult(
        loss=_run_epochs(model, optimizer, loader, epochs, device, proximal, backward)
    )


def train_dp(
    model: nn.Module,
    loss: PerSampleLoss,
    loader: DataLoader,
    epochs: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    history: Sequence[Segment],
    device: torch.device,
    proximal_mu: float = 0.0,
    grad_sample_mode: str = "hooks",
    *,
    seed: int | None = None,
) -> TrainResult:
    """DP-SGD (Abadi et al. 2016) through Opacus, continuing the accountant's `history`.

    The accountant is restored from `history` before training, so the returned history
    (and any epsilon computed from it) composes across rounds; a fresh accountant per
    round would silently under-report. Batches are Poisson samples of `loader`'s rows
    at exactly fedmodel.sampling.poisson_plan(rows, loader.batch_size): the history
    gains (noise_multiplier, 1/L, epochs * L). Every step adds noise and is accounted,
    an empty batch included. `model` is trained in place and keeps its plain parameter
    names (Opacus's wrapper is removed afterwards). `proximal_mu` > 0 adds FedProx's
    proximal term outside the clipping and noise (see `_ProximalTerm`).
    `grad_sample_mode` only changes how per-sample gradient norms are computed
    (fedmodel.dp_modes picks the fastest per model), never the clipping, the noise or
    the accounting. `seed` seeds the noise and the batches (fedmodel.sampling.dp_generators;
    None draws one from the OS); torch's global generator is not used.
    """
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    proximal = _ProximalTerm(model, proximal_mu, lr)
    engine = privacy_engine(history)
    private = make_private(
        engine, model, loss, optimizer, loader, noise_multiplier, max_grad_norm,
        grad_sample_mode, seed=seed,
    )  # fmt: skip
    try:
        with warnings.catch_warnings():
            # Opacus's hooks fire on the first layer, whose input needs no gradient: harmless.
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            mean_loss = _run_epochs(
                private.model,
                private.optimizer,
                private.loader,
                epochs,
                device,
                proximal,
                private.backward,
            )
    finally:
        private.close()
    return TrainResult(loss=mean_loss, history=merge_segments(engine.accountant.history))


def privacy_engine(history: Sequence[Segment] = ()) -> Any:
    """An Opacus PrivacyEngine whose accountant continues from `history`."""
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Opacus's secure_mode needs torchcsprng, which does not exist for torch 2.x.
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant=ACCOUNTANT)
    if history:
        engine.accountant.load_state_dict({"history": list(history), "mechanism": ACCOUNTANT})
    return engine


@dataclass(frozen=True)
class PrivateTraining:
    """What Opacus's make_private hands back, in the same shape for every grad-sample mode."""

    model: Any  # an Opacus GradSampleModule wrapping the caller's model, or the model
    optimizer: Any  # a DPOptimizer, or fedmodel.fused_dp.FusedLinearDPSGD
    loader: DataLoader
    close: Callable[[], None]  # removes the hooks: the model keeps its plain parameter names
    backward: BatchBackward  # this mode's backward pass: call it between zero_grad and step


def make_private(
    engine: Any,
    model: nn.Module,
    loss: PerSampleLoss,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str,
    poisson_sampling: bool = True,
    *,
    seed: int | None = None,
) -> PrivateTraining:
    """Opacus's `engine.make_private` for any grad-sample mode (hooks, ghost, functorch, ew),
    or our fused DP-SGD step for Linear-only models (`fused`, fedmodel/fused_dp.py) on
    Opacus's accountant.

    With `poisson_sampling`, batches come from fedmodel.sampling's Poisson sampler (not
    Opacus's, whose epoch can be one batch short of the rate it records); without, from
    `loader` as it is (benchmarks: fixed batches). Either way Opacus's rule holds:
    sample rate 1 / len(loader), expected batch int(rows * rate). Noise and batches come
    from generators seeded by `seed` (fedmodel.sampling.dp_generators; None: from the OS).

    Ghost clipping (Li et al. 2022, "Large Language Models Can Be Strong Differentially
    Private Learners") clips without materialising per-sample gradients: its criterion
    runs two backward passes inside `loss.backward()`, which the mode's `backward` calls.
    """
    noise_generator, sampling_generator = dp_generators(seed, next(model.parameters()).device)
    if poisson_sampling:
        loader = poisson_loader(loader, sampling_generator)
    sample_rate = 1 / len(loader)
    if grad_sample_mode == "fused":
        from fedmodel.fused_dp import FusedLinearDPSGD

        (group,) = optimizer.param_groups
        if type(optimizer) is not torch.optim.SGD or group["momentum"] or group["weight_decay"]:
            raise ValueError("grad-sample mode 'fused' implements plain SGD only")
        fused = FusedLinearDPSGD(
            model, group["lr"], noise_multiplier, max_grad_norm,
            int(len(loader.dataset) * sample_rate),  # type: ignore[arg-type]
            engine.accountant, sample_rate, noise_generator,
        )  # fmt: skip
        return PrivateTraining(model, fused, loader, fused.close, mean_loss_backward(model, loss))
    made = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=ReducibleLoss(loss),
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,  # the loader samples already
        noise_generator=noise_generator,
        grad_sample_mode=grad_sample_mode,
    )
    if grad_sample_mode == "ghost":
        private_model, private_optimizer, criterion, _ = made
        backward = ghost_backward(private_model, private_optimizer, criterion)
    else:
        private_model, private_optimizer, _ = made
        backward = per_sample_backward(private_model, loss)
    if poisson_sampling:  # as Opacus does under its own Poisson sampling
        private_model.forbid_grad_accumulation()
    return PrivateTraining(private_model, private_optimizer, loader, private_model._close, backward)


class _ProximalTerm:
    """FedProx's proximal term mu/2 * ||w - w_global||^2 (Li et al. 2020, "Federated
    Optimization in Heterogeneous Networks"), as a decoupled gradient step.

    Each SGD step also moves every weight by -lr * mu * (w - w_global), with w taken
    before the step: for plain SGD that is exactly SGD on loss + mu/2 * ||w - w_global||^2.
    Under DP-SGD it must be done this way: Opacus rebuilds each gradient from per-sample
    gradients (clipped, noised), so a term added to the loss would be silently dropped.
    The term does not touch the data, so applying it unclipped and noiseless costs no
    privacy (post-processing).
    """

    def __init__(self, model: nn.Module, mu: float, lr: float) -> None:
        self.scale = lr * mu
        self.parameters = [p for p in model.parameters() if p.requires_grad] if mu > 0 else []
        self.anchor = [p.detach().clone() for p in self.parameters]

    def pull(self) -> list[torch.Tensor]:
        """The step's proximal displacement, read before the optimiser moves the weights."""
        if not self.anchor:
            return []
        with torch.no_grad():
            return [self.scale * (p - a) for p, a in zip(self.parameters, self.anchor, strict=True)]

    @torch.no_grad()
    def apply(self, displacement: list[torch.Tensor]) -> None:
        for parameter, step in zip(self.parameters, displacement, strict=True):
            parameter.sub_(step)


def _run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    epochs: int,
    device: torch.device,
    proximal: _ProximalTerm,
    backward: BatchBackward,
) -> float:
    """Every batch is a step, an empty one too: DP-SGD's noise and accounting need it."""
    model.train()
    total_loss, total_rows = 0.0, 0
    for _ in range(epochs):
        for features, labels in loader:
            optimizer.zero_grad()
            loss, rows = backward(features.to(device), labels.to(device))
            displacement = proximal.pull()
            optimizer.step()
            proximal.apply(displacement)
            total_loss += loss
            total_rows += rows
    return total_loss / max(total_rows, 1)
