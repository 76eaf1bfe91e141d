"""Simulated SecAgg+ dropouts: clients that fail in the middle of the protocol."""

from __future__ import annotations

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedmodel.config import RunConfig
from fedmodel.protocol import PARTITION_ID_KEY

SIMULATED_DROPOUT_CODE = 4002  # beside BUDGET_EXHAUSTED_CODE, clear of Flower's 0-8


def simulated_dropout_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The last `secagg-dropouts` partitions fail right after sharing their keys.

    They answer the masked-vector stage with an error, so the coordinator must rebuild
    their masks from the survivors' key shares: a dropout in the middle of the protocol.
    """
    if msg.metadata.message_type == MessageType.TRAIN and PARTITION_ID_KEY in context.node_config:
        config = RunConfig.from_run_config(context.run_config)
        partition_id = int(str(context.node_config[PARTITION_ID_KEY]))
        stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
        if (
            stage == Stage.COLLECT_MASKED_VECTORS
            and partition_id >= config.clients - config.secagg_dropouts
        ):
            reason = f"client {partition_id}: simulated dropout after sharing its keys"
            return Message(error=Error(SIMULATED_DROPOUT_CODE, reason), reply_to=msg)
    return call_next(msg, context)
