"""Checkpoints, written atomically so a crash never leaves a torn file.

Every round writes `round-NNNN.pt` (the global model) and refreshes `latest.pt`, which
also holds what a resumed run needs to go on exactly where this one stopped: the
strategy's internal state (FedAdam's moments, FedAvgM's momentum), the random generators'
states (Flower samples nodes with Python's `random`) and the run record. Client-level DP
noise is drawn from none of these generators (server.central_dp), so a resumed round
cannot replay it. Files are written to a temporary name and renamed (`os.replace`), so a
reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest.pt"
# Attributes of Flower strategies that carry state from round to round: the FedOpt
# family's (FedAdam, FedYogi, FedAdagrad) moments of the server update, FedAvgM's
# momentum (a list of arrays, in the model's order) and adaptive clipping's current norm.
# Wrappers (ours, Flower's DP ones) hold the next strategy in `inner` or `strategy`; the
# whole chain is searched.
STRATEGY_STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "clipping_norm")
WRAPPED_STRATEGY_ATTRIBUTES = ("inner", "strategy")
StrategyState = dict[str, dict[str, torch.Tensor] | list[torch.Tensor] | float]


@dataclass(frozen=True)
class ResumePoint:
    """Everything `latest.pt` holds about the last completed round."""

    completed_round: int
    state_dict: dict[str, torch.Tensor]
    strategy_state: StrategyState
    rng_state: dict[str, Any]
    record_state: dict[str, Any]


def save_checkpoint(
    directory: Path,
    server_round: int,
    state_dict: dict[str, torch.Tensor],
    resume_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write `round-NNNN.pt` and refresh `latest.pt` (with `resume_state` when given)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round-{server_round:04d}.pt"
    payload: dict[str, Any] = {"round": server_round, "state_dict": state_dict}
    _save_atomic(payload, path)
    _save_atomic({**payload, **(resume_state or {})}, directory / LATEST)
    return path


def _save_atomic(payload: Mapping[str, Any], target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    torch.save(dict(payload), partial)
    os.replace(partial, target)


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(round, state_dict) of a checkpoint written by `save_checkpoint`."""
    payload = torch.load(path, weights_only=True)
    return int(payload["round"]), payload["state_dict"]


def load_resume_point(directory: Path) -> ResumePoint | None:
    """The resumable state in `directory/latest.pt`; None when there is none."""
    path = directory / LATEST
    if not path.is_file():
        return None
    payload = torch.load(path, weights_only=True)
    if "rng" not in payload:
        return None
    return ResumePoint(
        completed_round=int(payload["round"]),
        state_dict=payload["state_dict"],
        strategy_state=payload["strategy"],
        rng_state=payload["rng"],
        record_state=payload["record"],
    )


def _strategy_chain(strategy: object) -> list[object]:
    """`strategy` and every strategy it wraps, outermost first."""
    chain = [strategy]
    while (inner := _wrapped(chain[-1])) is not None:
        chain.append(inner)
    return chain


def _wrapped(strategy: object) -> object | None:
    for name in WRAPPED_STRATEGY_ATTRIBUTES:
        if (inner := getattr(strategy, name, None)) is not None:
            return inner
    return None


def strategy_state(strategy: object) -> StrategyState:
    """The round-to-round state of a strategy chain (empty for plain FedAvg)."""
    state: StrategyState = {}
    for layer in _strategy_chain(strategy):
        for name in STRATEGY_STATE_ATTRIBUTES:
            value = getattr(layer, name, None)
            if isinstance(value, dict) and value:
                state[name] = {key: torch.from_numpy(np.array(a)) for key, a in value.items()}
            elif isinstance(value, list) and value:
                state[name] = [torch.from_numpy(np.array(a)) for a in value]
            elif isinstance(value, float):
                state[name] = value
    return state


def restore_strategy_state(strategy: object, state: Mapping[str, Any]) -> None:
    """Put back what `strategy_state` took (arrays as the numpy arrays Flower uses)."""
    chain = _strategy_chain(strategy)
    for name, value in state.items():
        layer = next((layer for layer in chain if hasattr(layer, name)), None)
        if layer is None:
            raise ValueError(f"the checkpoint holds strategy state {name!r} this strategy lacks")
        if isinstance(value, dict):
            value = {key: tensor.numpy() for key, tensor in value.items()}
        elif isinstance(value, list):
            value = [tensor.numpy() for tensor in value]
        setattr(layer, name, value)


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators."""
    version, internal, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the three global generators back to what `rng_state` recorded."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
