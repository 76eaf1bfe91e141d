"""Simulated Byzantine clients, for evaluating aggregation rules (simulation only).

Attacks replace the honest reply of the first `round(attackers * clients)` partitions:
- sign-flip: the update reversed (global - (local - global));
- scaled: the update multiplied by 10 (a boosting attack, Bhagoji et al. 2019);
- gaussian: honest weights plus N(0, 100^2) noise on every value;
- nan: every value NaN (what a crashed or buggy client can send).
Only the simulation's ClientApp (simulations/apps.py) installs the mod; a deployed node's
(client/app.py) has no such hook, so a coordinator cannot use it to make a real data owner
send poisoned weights.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedmodel.config import RunConfig
from fedmodel.protocol import ARRAYS_KEY, PARTITION_ID_KEY

GAUSSIAN_ATTACK_STD = 100.0
SCALED_ATTACK_FACTOR = 10.0


def is_attacker(partition_id: int, clients: int, attackers: float) -> bool:
    return partition_id < round(attackers * clients)


def poison(
    global_state: dict[str, torch.Tensor],
    local_state: dict[str, torch.Tensor],
    attack: str,
    seed: int,
) -> dict[str, torch.Tensor]:
    """What an attacking client sends instead of `local_state`."""
    generator = torch.Generator().manual_seed(seed)
    poisoned = {}
    for name, local in local_state.items():
        update = local - global_state[name]
        if attack == "sign-flip":
            poisoned[name] = global_state[name] - update
        elif attack == "scaled":
            poisoned[name] = global_state[name] + SCALED_ATTACK_FACTOR * update
        elif attack == "gaussian":
            noise = torch.randn(local.shape, generator=generator) * GAUSSIAN_ATTACK_STD
            poisoned[name] = local + noise.to(local.dtype)
        elif attack == "nan":
            poisoned[name] = torch.full_like(local, float(np.nan))
        else:
            raise ValueError(f"unknown attack {attack!r}")
    return poisoned


def simulated_attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: poison this simulated client's training reply if it is an attacker."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    if PARTITION_ID_KEY not in context.node_config:
        return reply
    config = RunConfig.from_run_config(context.run_config)
    partition_id = int(str(context.node_config[PARTITION_ID_KEY]))
    if config.attack == "none" or not is_attacker(partition_id, config.clients, config.attackers):
        return reply
    global_state = msg.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    local_state = reply.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    seed = config.seed * 7_919 + partition_id
    reply.content[ARRAYS_KEY] = ArrayRecord(poison(global_state, local_state, config.attack, seed))
    return reply
