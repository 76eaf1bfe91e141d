"""FedModel's SecAgg+ client mod for distributed DP: the client's noise is in before masking.

Kairouz, Liu and Steinke 2021 (DDG): each client clips its model update in L2, rotates,
scales, rounds and adds discrete Gaussian noise (fedmodel.privacy.distributed_dp.encode),
so what secure aggregation (Bell et al. 2020, SecAgg+) sums is already private, and the
coordinator only ever unmasks the noisy sum.

Flower's `secaggplus_mod` quantizes float weights into [0, quantization_range), which
must stay below the modulus, so residues modulo 2**bits cannot pass through its
quantizer. They need not: SecAgg+'s masks are additive modulo the modulus and do not
depend on the vector. This mod runs Flower's `secaggplus_mod` unchanged (key agreement,
Shamir shares, mask generation, unmasking) on a vector that quantizes to exactly zero
(every coordinate at -clipping_range, one example), so Flower returns the masks alone,
and adds the client's residues to them modulo 2**bits. The result is exactly what
masking the residues would give; the weight factor (1) stays Flower's.

The mechanism's parameters come from the client's own run config
(fedmodel.distributed_secagg), only the public rotation seed from the coordinator.
Rounding and noise draw from a seed per client and round in simulation (reproducible),
from a generator seeded with 128 bits of the OS CSPRNG on a deployed node
(fedmodel.sampling.dp_numpy_generator), every round. A deployed node charges its owner's
budget for the round before encoding (client.app.charge_distributed_round) and refuses
the round, as DP-SGD rounds are refused, when the budget cannot pay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import (
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
)
from flwr.compat.common import recorddict_compat as compat

from client.app import charge_distributed_round, round_seed
from fedmodel.config import RunConfig
from fedmodel.distributed_secagg import (
    ROTATION_SEED_KEY,
    WORKFLOW_MAX_WEIGHT,
    WORKFLOW_QUANTIZATION_RANGE,
    distributed_parameters,
    flatten,
)
from fedmodel.privacy.budget import BUDGET_EXHAUSTED_CODE, BudgetExhausted
from fedmodel.privacy.distributed_dp import encode
from fedmodel.protocol import PARTITION_ID_KEY, SERVER_ROUND_KEY
from fedmodel.sampling import dp_numpy_generator

# (partition, round, plaintext update, residues, masked residues): a test harness's view
EncodingObserver = Callable[[int, int, np.ndarray, np.ndarray, np.ndarray], None]
NOISE_STREAM = 18  # keeps the rounding and noise seed apart from DP-SGD's for the round


def distributed_dp_mod(observe: EncodingObserver | None = None) -> Mod:
    """The mod; `observe` (a test harness's) sees each client's update, residues and
    masked vector, the last exactly as the coordinator receives it."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        encoded: list[tuple[int, int, np.ndarray, np.ndarray]] = []

        def encode_reply(train: Message, state: Context) -> Message:
            return _encode_update(train, state, call_next, encoded)

        reply = secaggplus_mod(msg, context, encode_reply)
        if not encoded or reply.has_error():
            return reply
        partition_id, server_round, update, residues = encoded[0]
        modulus = _agreed_modulus(context)
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        masked_bytes = cast(list[bytes], configs[Key.MASKED_PARAMETERS])
        factor, zero = (bytes_to_ndarray(b) for b in masked_bytes)
        masked = np.mod(zero.astype(np.int64) + residues, modulus).astype(zero.dtype)
        configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(factor), ndarray_to_bytes(masked)]
        if observe is not None:
            observe(partition_id, server_round, update, residues, masked)
        return reply

    return mod


def _encode_update(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    encoded: list[tuple[int, int, np.ndarray, np.ndarray]],
) -> Message:
    """Train, encode the update into `encoded`, and hand Flower's mod an all-zero vector."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    instructions = compat.recorddict_to_fitins(msg.content, keep_input=True)
    result = compat.recorddict_to_fitres(reply.content, keep_input=True)
    update = flatten(parameters_to_ndarrays(result.parameters)) - flatten(
        parameters_to_ndarrays(instructions.parameters)
    )
    config = RunConfig.from_run_config(context.run_config)
    parameters = distributed_parameters(config, update.size)
    partition_id = int(str(context.node_config.get(PARTITION_ID_KEY, -1)))
    server_round = int(instructions.config[SERVER_ROUND_KEY])
    if PARTITION_ID_KEY not in context.node_config:  # a deployed owner's budget pays first
        try:
            charge_distributed_round(config, context, parameters, server_round)
        except BudgetExhausted as refusal:
            return Message(error=Error(BUDGET_EXHAUSTED_CODE, str(refusal)), reply_to=msg)
    generator = dp_numpy_generator(noise_seed(config, context, partition_id, server_round))
    rotation_seed = int(instructions.config[ROTATION_SEED_KEY])
    residues = encode(update, parameters, rotation_seed, generator)
    encoded.append((partition_id, server_round, update, residues))
    clipping = float(_secagg_state(context)["clipping_range"])  # type: ignore[arg-type]
    result.parameters = ndarrays_to_parameters([np.full(residues.shape, -clipping)])
    result.num_examples = 1  # weight factor round(1 / max_weight * 1) = 1
    return Message(compat.fitres_to_recorddict(result, keep_input=True), reply_to=msg)


def noise_seed(
    config: RunConfig, context: Context, partition_id: int, server_round: int
) -> int | None:
    """A simulated client's rounding and noise seed (reproducible, apart from DP-SGD's);
    None on a deployed node, whose generator is then seeded from the OS CSPRNG, so that
    nothing the coordinator sends (run config, rotation seed) bears on its noise."""
    if PARTITION_ID_KEY not in context.node_config:
        return None
    seed = round_seed(config, context, partition_id, server_round)
    stream = np.random.SeedSequence((seed, NOISE_STREAM)).generate_state(2, np.uint64)
    return int(stream[0]) << 64 | int(stream[1])


def _secagg_state(context: Context) -> dict[str, object]:
    return dict(context.state.config_records[RECORD_KEY_STATE])


def _agreed_modulus(context: Context) -> int:
    """The workflow's modulus, once its setup is checked to be the one agreed on
    (fedmodel.distributed_secagg): otherwise the masked vector was not the residues'."""
    state = _secagg_state(context)
    modulus = 1 << RunConfig.from_run_config(context.run_config).distributed_bits
    agreed = {
        "mod_range": modulus,
        "target_range": WORKFLOW_QUANTIZATION_RANGE,
        "max_weight": WORKFLOW_MAX_WEIGHT,
    }
    for name, value in agreed.items():
        if state[name] != value:
            raise ValueError(f"the coordinator set SecAgg+'s {name} to {state[name]}, not {value}")
    return modulus
