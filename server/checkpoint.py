"""Global-model checkpoints, written atomically so a crash never leaves a torn file."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_checkpoint(
    directory: Path, server_round: int, state_dict: dict[str, torch.Tensor]
) -> Path:
    """Write `round-NNNN.pt` and refresh `latest.pt`; returns the round's file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round-{server_round:04d}.pt"
    for target in (path, directory / "latest.pt"):
        partial = target.with_suffix(".pt.partial")
        torch.save({"round": server_round, "state_dict": state_dict}, partial)
        os.replace(partial, target)
    return path


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(round, state_dict) of a checkpoint written by `save_checkpoint`."""
    payload = torch.load(path, weights_only=True)
    return int(payload["round"]), payload["state_dict"]
