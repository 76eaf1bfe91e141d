"""Which Opacus grad-sample mode each registered model trains with under DP-SGD.

Every mode computes the same clipped, noised update (tests/test_dp_modes.py checks each
against per-sample gradients computed one sample at a time); they differ only in speed
and memory. The table holds the fastest per model and device type as measured by
benchmarks/dp_overhead.py (README, "DP overhead"): ExpandedWeights (`ew`, per-sample
gradients from PyTorch's own autograd) wins everywhere except the CNN on a GPU at
batches of 256 and more, where `hooks` wins and ew's convolution path falls behind
(3.3x vs 4.6x plain SGD at 256, 3.4x vs 11.4x at 1024 on an H200). Ghost clipping and
functorch were never the fastest for these small models. ew cannot process an empty
batch; the training loop skips those before the forward pass.
"""

from __future__ import annotations

GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch", "ew")

FASTEST_MODE = {  # (model, device type) -> mode
    ("mlp", "cpu"): "ew",
    ("mlp", "cuda"): "ew",
    ("logreg", "cpu"): "ew",
    ("logreg", "cuda"): "ew",
    ("cnn", "cpu"): "ew",
    ("cnn", "cuda"): "hooks",
}


def grad_sample_mode(model: str, device_type: str = "cpu") -> str:
    """The mode `model` trains with on `device_type`; Opacus's default (hooks) otherwise."""
    return FASTEST_MODE.get((model, device_type), "hooks")
