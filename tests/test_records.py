"""Reply validation: each malformed reply is rejected with a reason naming the problem."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedmodel.models import build_model
from fedmodel.protocol import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from fedmodel.records import reply_rejection

GLOBAL = build_model("mlp", 9).state_dict()


def reply(state: dict[str, torch.Tensor], **metrics: float) -> RecordDict:
    return RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(state),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: 10, **metrics}),
        }
    )


def test_an_honest_reply_is_accepted() -> None:
    state = {name: tensor + 0.01 for name, tensor in GLOBAL.items()}
    assert reply_rejection(reply(state), ArrayRecord(GLOBAL)) is None


def test_nan_values_are_rejected() -> None:
    state = dict(GLOBAL) | {"0.bias": torch.full_like(GLOBAL["0.bias"], float("nan"))}
    assert "'0.bias' contains NaN" in str(reply_rejection(reply(state), ArrayRecord(GLOBAL)))


def test_a_wrong_shape_is_rejected() -> None:
    state = dict(GLOBAL) | {"2.weight": torch.zeros(3, 3)}
    reason = str(reply_rejection(reply(state), ArrayRecord(GLOBAL)))
    assert "'2.weight'" in reason and "[3, 3]" in reason and "[16, 32]" in reason


def test_a_wrong_dtype_is_rejected() -> None:
    state = dict(GLOBAL) | {"0.weight": GLOBAL["0.weight"].double()}
    assert "float64" in str(reply_rejection(reply(state), ArrayRecord(GLOBAL)))


def test_a_missing_array_is_rejected() -> None:
    state = {name: t for name, t in GLOBAL.items() if name != "4.bias"}
    assert "missing ['4.bias']" in str(reply_rejection(reply(state), ArrayRecord(GLOBAL)))


def test_update_norm_bound_uses_the_distance_to_the_global_model() -> None:
    shift = 0.01
    state = {name: tensor + shift for name, tensor in GLOBAL.items()}
    size = sum(t.numel() for t in GLOBAL.values())
    norm = shift * np.sqrt(size)
    assert reply_rejection(reply(state), ArrayRecord(GLOBAL), max_update_norm=norm * 1.01) is None
    reason = reply_rejection(reply(state), ArrayRecord(GLOBAL), max_update_norm=norm * 0.99)
    assert reason is not None and "exceeds the bound" in reason


@pytest.mark.parametrize("extra", ["second"])
def test_extra_records_are_rejected(extra: str) -> None:
    content = reply(dict(GLOBAL))
    content[extra] = ArrayRecord(GLOBAL)
    assert "expected one ArrayRecord" in str(reply_rejection(content, ArrayRecord(GLOBAL)))
