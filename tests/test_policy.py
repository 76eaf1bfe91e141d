"""The owner's policy, task approvals and release rules, on real files and real messages."""

from __future__ import annotations

import math
import stat
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.executor import released
from client.policy import OwnerPolicy, PolicyError, load_policy, review, save_policy
from client.tasks import (
    BUILTIN_TASK,
    InstalledTask,
    approval_refusal,
    approve,
    installed_task,
    load_approvals,
    revoke_approval,
)
from fedmodel.config import RunConfig


@pytest.fixture
def node(tmp_path: Path) -> Path:
    save_policy(tmp_path, OwnerPolicy(budget_epsilon=2.0))
    approve(tmp_path, BUILTIN_TASK)
    return tmp_path


def honest(**changes: object) -> dict[str, object]:
    return RunConfig(scenario="deployment", epsilon=1.0).replace(**changes).to_run_config()


def test_policy_file_is_private_and_round_trips(node: Path) -> None:
    for name in ("policy.json", "approvals.json"):
        assert stat.S_IMODE((node / name).stat().st_mode) == 0o600
    policy = load_policy(node)
    assert policy == OwnerPolicy(budget_epsilon=2.0)
    assert (policy.require_dp, policy.budget_delta, policy.max_local_epochs) == (True, 1e-5, 5)
    assert (policy.max_rounds, policy.count_rounding, policy.release_train_loss) == (100, 10, False)


@pytest.mark.parametrize(
    "values",
    [
        {"budget_epsilon": 0.0},
        {"budget_epsilon": math.inf},
        {"budget_epsilon": 1, "budget_delta": 1},
    ],
)
def test_an_invalid_policy_is_a_one_line_error(values: dict[str, float]) -> None:
    with pytest.raises(PolicyError):
        OwnerPolicy(**values)


def test_a_missing_policy_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="--budget-epsilon"):
        load_policy(tmp_path)


def test_an_honest_request_passes_and_each_excess_is_refused(node: Path) -> None:
    policy = load_policy(node)
    assert review(node, policy, honest(), MessageType.TRAIN) is None
    refusals = {
        "DP mode 'off'": honest(dp="off"),
        "DP mode 'client'": honest(dp="client"),  # client-level DP protects nothing here
        "above the owner's delta": honest(delta=1e-4),
        "above the owner's whole budget": honest(epsilon=2.5),
        "6 local epochs": honest(local_epochs=6),
        "101 rounds": honest(rounds=101),
        "not approved": honest(app_task_version="0.0.1"),
        "names no task": {k: v for k, v in honest().items() if k != "app-task"},
        "not a FedModel run": {**honest(), "batch-size": "many"},
    }
    for reason, run_config in refusals.items():
        refusal = review(node, policy, run_config, MessageType.TRAIN)
        assert refusal is not None and reason in refusal, (reason, refusal)
    # What the owner allows, it allows: a smaller delta, fewer epochs, no DP when opted out
    assert review(node, policy, honest(delta=1e-6, epsilon=2.0), MessageType.TRAIN) is None
    lenient = policy.replace(require_dp=False)
    assert review(node, lenient, honest(dp="off"), MessageType.TRAIN) is None


def test_releases_the_owner_withholds_are_refused(node: Path) -> None:
    policy = load_policy(node).replace(release_statistics=False, release_evaluation=False)
    assert "feature statistics" in str(review(node, policy, honest(), MessageType.QUERY))
    assert "evaluation" in str(review(node, policy, honest(), MessageType.EVALUATE))
    assert review(node, policy, honest(), MessageType.TRAIN) is None


def test_a_changed_source_needs_a_new_approval(tmp_path: Path) -> None:
    source = tmp_path / "task"
    source.mkdir()
    (source / "train.py").write_text("LR = 0.1\n")
    task = InstalledTask("mine", "1.0", "task.train:app", "task.train:app", (source,))
    before = task.source_digest()
    (source / "train.py").write_text("LR = 0.2\n")
    assert task.source_digest() != before
    (source / "train.py").write_text("LR = 0.1\n")
    assert task.source_digest() == before  # the digest is of content, not of time
    (source / "extra.py").write_text("")
    assert task.source_digest() != before  # a new file is a change too


def test_approve_list_and_revoke(node: Path) -> None:
    (approved,) = load_approvals(node)
    builtin = installed_task(BUILTIN_TASK)
    assert (approved.name, approved.version) == (builtin.name, builtin.version)
    assert approved.sha256 == builtin.source_digest()
    assert approval_refusal(load_approvals(node), builtin.name, builtin.version) is None
    forged = [approved.__class__(approved.name, approved.version, "0" * 64, "then")]
    assert "changed since" in str(approval_refusal(forged, builtin.name, builtin.version))
    revoke_approval(node, BUILTIN_TASK)
    assert load_approvals(node) == []
    assert "not approved" in str(approval_refusal([], builtin.name, builtin.version))


def _train_reply(metrics: dict[str, float | int]) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    request = Message(RecordDict({"arrays": ArrayRecord()}), 1, MessageType.TRAIN)
    request.metadata.__dict__["_message_id"] = request.object_id
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=request)


def test_counts_leave_rounded_and_the_training_loss_withheld() -> None:
    policy = OwnerPolicy(budget_epsilon=1.0)
    reply = released(policy, _train_reply({"num-examples": 96, "train-loss": 0.53, "epsilon": 0.7}))
    metrics = reply.content["metrics"]
    assert dict(metrics) == {"num-examples": 100, "epsilon": 0.7}
    small = released(policy, _train_reply({"num-examples": 3, "auroc-weight": 0}))
    assert dict(small.content["metrics"]) == {"num-examples": 10, "auroc-weight": 0}
    open_policy = policy.replace(release_train_loss=True, count_rounding=1)
    kept = released(open_policy, _train_reply({"num-examples": 96, "train-loss": 0.5}))
    assert dict(kept.content["metrics"]) == {"num-examples": 96, "train-loss": 0.5}
