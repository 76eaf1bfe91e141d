"""Which Opacus grad-sample mode each registered model trains with under DP-SGD.

Every mode computes the same clipped, noised update (tests/test_dp_modes.py checks each
against per-sample gradients computed one sample at a time); they differ only in speed
and memory. The table holds the fastest per model as measured by
benchmarks/dp_overhead.py (numbers in README, "DP overhead").
"""

from __future__ import annotations

GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch", "ew")

FASTEST_MODE = {
    # Linear layers only: ghost clipping gets each sample's gradient norm from the
    # layer's activations and output gradients, without materialising per-sample
    # gradients.
    "mlp": "ghost",
    "logreg": "ghost",
    # Convolutions have no ghost norm sampler in Opacus 1.6; hooks' per-sample
    # gradients (unfold + einsum) beat the alternatives.
    "cnn": "hooks",
}


def grad_sample_mode(model: str) -> str:
    """The mode `model` trains with; Opacus's default (hooks) for models not measured."""
    return FASTEST_MODE.get(model, "hooks")
