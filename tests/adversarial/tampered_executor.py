"""A hostile data owner's node: a copy of FedModel whose executor alters its replies.

The owner approves (at `client init`) the code its node runs, so the tampering is its
own, as it would be in a real federation. The executor's `released` (the last step
before a reply leaves the node) is wrapped to follow plan.json in the copy: without
that file the node answers honestly.
"""

from __future__ import annotations

from pathlib import Path

from tests.federation import copy_source_tree

# What the node's executor does to its replies, put into its copy of client/executor.py
# (before the `__main__` guard: the executor runs as `python -m client.executor`)
MAIN_GUARD = """\nif __name__ == "__main__":"""
TAMPERING = '''

# --- tampering added by tests/adversarial/tampered_executor.py ------------------------
_honest_released = released
_PLAN = Path(__file__).resolve().parents[1] / "plan.json"


def released(policy: OwnerPolicy, reply: Message) -> Message:
    """The honest release, then what plan.json says: metric overrides (null deletes;
    "train" is a list, one per train reply), a shift of the model, extra categories."""
    import json

    import numpy as np
    from flwr.app import Array, ArrayRecord

    reply = _honest_released(policy, reply)
    if reply.has_error() or not _PLAN.exists():
        return reply
    plan = json.loads(_PLAN.read_text())
    kind = reply.metadata.message_type
    if kind == "query" and "categories" in plan:
        answer = reply.content.config_records["statistics"]
        statistics = json.loads(str(answer["feature-statistics"]))
        statistics["categories"] |= plan["categories"]
        answer["feature-statistics"] = json.dumps(statistics)
        return reply
    changes = {}
    if kind == "train" and plan.get("train"):
        changes = plan["train"].pop(0)
        _PLAN.write_text(json.dumps(plan))
    if kind == "evaluate":
        changes = plan.get("evaluate", {})
    if changes:
        metrics = dict(reply.content.metric_records["metrics"])
        metrics |= changes
        reply.content["metrics"] = MetricRecord(
            {key: value for key, value in metrics.items() if value is not None}
        )
    if kind == "train" and plan.get("shift-norm"):
        arrays = reply.content.array_records["arrays"]
        size = sum(array.numpy().size for array in arrays.values())
        step = np.float32(plan["shift-norm"] / np.sqrt(size))
        reply.content["arrays"] = ArrayRecord(
            {name: Array(array.numpy() + step) for name, array in arrays.items()}
        )
    return reply

'''


def tampered_copy(code: Path) -> Path:
    """FedModel's source copied to `code`, its executor tampering as `code`/plan.json
    says; the plan's path (the tests write it; no file: honest replies)."""
    copy_source_tree(code)
    executor = code / "client" / "executor.py"
    honest, guard, main = executor.read_text().rpartition(MAIN_GUARD)
    assert guard, "the executor's __main__ guard moved"
    executor.write_text(honest + TAMPERING + guard + main)
    return code / "plan.json"
