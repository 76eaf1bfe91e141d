"""Which DP-SGD mode each registered model trains with.

The modes are Opacus 1.6's grad-sample modes (hooks, ghost, functorch, ew) and our
`fused` step for Linear-only models (fedmodel/fused_dp.py). Every mode computes the same
clipped, noised update (tests/test_dp_modes.py checks each against per-sample gradients
computed one sample at a time, and all of them against each other under Poisson
sampling); they differ only in speed and memory. The table holds the fastest per model
and device type as measured by benchmarks/dp_overhead.py (README, "DP overhead"):
`fused` for the tabular models (about 2x plain SGD or less on a CPU and an H200, where
the best Opacus mode, ExpandedWeights, costs 2.5-4x); `ew` for the CNN on the CPU and
`hooks` on a GPU, where ew's convolution path falls behind at batches of 256 and more
(4.6x vs 3.3x plain SGD at 256, 11.4x vs 3.4x at 1024 on an H200). Ghost clipping and
functorch were never the fastest for these small models. In every mode an empty Poisson
batch still takes its noisy, accounted step (fedmodel/training.py).
"""

from __future__ import annotations

GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch", "ew", "fused")

FASTEST_MODE = {  # (model, device type) -> mode
    ("mlp", "cpu"): "fused",
    ("mlp", "cuda"): "fused",
    ("logreg", "cpu"): "fused",
    ("logreg", "cuda"): "fused",
    ("cnn", "cpu"): "ew",
    ("cnn", "cuda"): "hooks",
}


def grad_sample_mode(model: str, device_type: str = "cpu") -> str:
    """The mode `model` trains with on `device_type`; Opacus's default (hooks) otherwise."""
    return FASTEST_MODE.get((model, device_type), "hooks")
