"""DP-SGD fused into a few tensor operations, for models built only of nn.Linear layers.

Opacus's cost on a small model is a fixed per-step overhead (hooks, then per-parameter
norm, clip, accumulate, noise and scale), several times a plain SGD step on the default
817-parameter MLP. For a Linear layer on (batch, features) rows the per-sample gradient
of the weight is the outer product g_i a_i^T of the sample's output gradient and input,
so its norm is |g_i| |a_i| and the clipped sum over the batch is one product
(c * G)^T A (the ghost-norm identity of Goodfellow 2015 and Li et al. 2022). This module
computes exactly Opacus's flat-clipping update from that: the same clip factor
min(1, C / (norm + 1e-6)), the same Gaussian noise N(0, (sigma C)^2) drawn per
parameter in parameter order (from the caller's generator), the same division by the
expected batch size, and one accountant step per optimizer step (tests/test_dp_modes.py
checks it against per-sample gradients and against Opacus's modes, weights and history).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedmodel.errors import ConfigError


def linear_only(model: nn.Module) -> bool:
    """Whether every parameter of `model` belongs to an nn.Linear layer: the models the
    fused step computes per-sample gradients for."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    covered = {id(p) for layer in layers for p in layer.parameters()}
    return bool(layers) and all(id(p) in covered for p in model.parameters())


class FusedLinearDPSGD:
    """SGD with per-sample clipping and Gaussian noise for a Linear-only `model`.

    Use as an optimizer (zero_grad, step) around `loss = mean of per-sample losses`;
    `close()` removes the hooks. Only the data's rows enter the gradients, so the
    guarantee is Opacus's: sample-level DP with the accountant's (sigma, q, steps).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        accountant: Any,
        sample_rate: float,
        generator: torch.Generator,
    ) -> None:
        if not linear_only(model):
            raise ConfigError(
                "grad-sample mode 'fused' needs a model whose only trainable layers are "
                "nn.Linear; use hooks or ew for this model"
            )
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.lr, self.noise_std = lr, noise_multiplier * max_grad_norm
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self.expected_batch_size, self.sample_rate = expected_batch_size, sample_rate
        self.accountant, self.generator = accountant, generator
        self.inputs: dict[nn.Linear, torch.Tensor] = {}
        self.output_grads: dict[nn.Linear, torch.Tensor] = {}
        self.handles = [layer.register_forward_hook(self._capture) for layer in self.layers]
        # Autograd need not compute the (unclipped) parameter gradients, only each layer's
        # output gradient: the weights stop requiring grad, the input starts to.
        self.handles.append(model.register_forward_pre_hook(_input_requires_grad))
        for parameter in self.parameters:
            parameter.requires_grad_(False)

    def _capture(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        if inputs[0].dim() != 2:
            raise ConfigError("grad-sample mode 'fused' needs (batch, features) inputs")
        assert isinstance(layer, nn.Linear)
        if layer in self.inputs:  # a shared layer: its per-sample norm would be wrong
            raise ConfigError("grad-sample mode 'fused' needs each Linear layer used once")
        self.inputs[layer] = inputs[0].detach()
        if output.requires_grad:
            output.register_hook(lambda grad: self.output_grads.__setitem__(layer, grad))

    def zero_grad(self) -> None:
        """Forget the last forward pass (parameters carry no .grad in this mode)."""
        self.inputs.clear()
        self.output_grads.clear()

    @torch.no_grad()
    def step(self) -> None:
        """Clip each sample's whole gradient, sum, add noise, average, descend; account.

        No captured batch (Poisson sampling drew no row) is a zero clipped sum: the
        step still adds noise and is accounted, as DP-SGD requires.
        """
        clipped = self._clipped_sum()
        scale = self.lr / self.expected_batch_size
        for parameter in self.parameters:
            update = clipped.get(parameter, torch.zeros_like(parameter))
            if self.noise_std > 0:  # drawn as Opacus draws it: per parameter, in order
                update = update + torch.normal(
                    mean=0,
                    std=self.noise_std,
                    size=parameter.shape,
                    device=parameter.device,
                    dtype=parameter.dtype,
                    generator=self.generator,
                )
            parameter.sub_(update * scale)
        self.inputs.clear()
        self.output_grads.clear()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def _clipped_sum(self) -> dict[torch.Tensor, torch.Tensor]:
        """Sum over the batch of each sample's clipped gradient, per parameter.

        A sample whose gradient norm is not finite (an inf or NaN entry, or an overflow)
        contributes exactly zero: a NaN clip factor would pass the clamp at 1, and a
        zero factor times an inf entry is NaN again, so its rows are zeroed as well.
        Otherwise a crafted model could turn the reply into NaN exactly when one target
        record is sampled.
        """
        if not self.inputs:
            return {}
        layers = self.layers
        # The loss is a batch mean: each row of G is 1/B of that sample's own gradient.
        batch = self.inputs[layers[0]].shape[0]
        grads = {layer: self.output_grads[layer] * batch for layer in layers}
        squared = torch.zeros(batch, device=self.parameters[0].device)
        for layer in layers:
            inputs_sq = self.inputs[layer].square().sum(1)
            if layer.bias is not None:
                inputs_sq = inputs_sq + 1
            squared += grads[layer].square().sum(1) * inputs_sq
        finite = torch.isfinite(squared)[:, None]
        factor = (self.max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        clipped: dict[torch.Tensor, torch.Tensor] = {}
        for layer in layers:
            weighted = torch.where(finite, grads[layer] * factor[:, None], 0.0)
            clipped[layer.weight] = weighted.T @ torch.where(finite, self.inputs[layer], 0.0)
            if layer.bias is not None:
                clipped[layer.bias] = weighted.sum(0)
        return clipped

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for parameter in self.parameters:
            parameter.requires_grad_(True)


def _input_requires_grad(
    model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    return (inputs[0].detach().requires_grad_(), *inputs[1:])
