"""The owner's policy, task approvals and release rules, on real files and real messages."""

from __future__ import annotations

import math
import stat
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import Code, EvaluateRes, FitRes, Parameters, Scalar, Status
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from client.executor import released, secagg_stage, training_round
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
        {"budget_epsilon": 1, "distributed_noise_shares": 0},
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


def test_a_node_requiring_secure_aggregation_refuses_a_plain_run(node: Path) -> None:
    policy = load_policy(node).replace(require_secagg=True)
    refusal = review(node, policy, honest(), MessageType.TRAIN)
    assert refusal is not None and "requires" in refusal and "--secagg" in refusal
    secure = honest(secagg=True, clients=3, secagg_shares=3, secagg_threshold=2)
    assert review(node, policy, secure, MessageType.TRAIN) is None


def test_distributed_dp_is_served_only_as_the_owner_agreed(node: Path) -> None:
    """Refused by default (the node would train without DP-SGD); accepted at or above the
    owner's least noise; an owner who requires it refuses every other DP mode."""
    secure = {"clients": 3, "secagg_shares": 3, "secagg_threshold": 2}
    distributed = honest(dp="distributed", distributed_noise=0.8, **secure)
    policy = load_policy(node)
    refusal = review(node, policy, distributed, MessageType.QUERY)
    assert refusal is not None and "--accept-distributed-dp" in refusal
    accepting = policy.replace(accept_distributed_dp=True)
    assert review(node, accepting, distributed, MessageType.TRAIN) is None
    demanding = accepting.replace(min_distributed_noise=1.0)
    refusal = review(node, demanding, distributed, MessageType.TRAIN)
    assert refusal is not None and "noise 0.8 is below the owner's minimum 1" in refusal
    requiring = policy.replace(require_distributed_dp=True)  # accepts it too
    assert review(node, requiring, distributed, MessageType.TRAIN) is None
    for other in (honest(), honest(secagg=True, **secure)):  # DP-SGD, with SecAgg+ or not
        refusal = review(node, requiring, other, MessageType.QUERY)
        assert refusal is not None and "requires distributed DP" in refusal


def _legacy_reply(content: RecordDict) -> Message:
    request = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    request.metadata.__dict__["_message_id"] = request.object_id
    return Message(content, reply_to=request)


def test_a_secagg_reply_leaves_as_the_owner_releases_a_plain_one() -> None:
    """Legacy (SecAgg+) replies carry metrics in their own records; the same rules apply,
    and a train reply's weight in the secure sum (1) is not a count to round."""
    policy = OwnerPolicy(budget_epsilon=1.0)
    metrics: dict[str, Scalar] = {"num-examples": 96, "train-loss": 0.5, "eval-num-examples": 24}
    fit = FitRes(Status(Code.OK, ""), Parameters([], ""), 1, metrics)
    shaped = released(policy, _legacy_reply(compat.fitres_to_recorddict(fit, True)))
    fitres = compat.recorddict_to_fitres(shaped.content, True)
    assert fitres.num_examples == 1
    assert fitres.metrics == {"num-examples": 100, "eval-num-examples": 20}
    scored = EvaluateRes(Status(Code.OK, ""), 0.4, 24, {"num-examples": 24, "loss": 0.4})
    shaped = released(policy, _legacy_reply(compat.evaluateres_to_recorddict(scored)))
    evaluateres = compat.recorddict_to_evaluateres(shaped.content)
    assert (evaluateres.num_examples, evaluateres.metrics["num-examples"]) == (20, 20)


def test_only_the_secagg_stage_that_trains_counts_for_the_replay_rule() -> None:
    """SecAgg+ sends four train messages per round; only the one with the fit
    instruction (collect masked vectors) trains, so only it counts as the round's."""

    def stage(name: str, **records: ConfigRecord) -> Message:
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: name}), **records})
        return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)

    fit = ConfigRecord({"server-round": 3})
    for name in (Stage.SETUP, Stage.SHARE_KEYS, Stage.UNMASK):
        assert training_round(stage(name), secagg=True) is None
        assert secagg_stage(stage(name)) == name
    collect = stage(Stage.COLLECT_MASKED_VECTORS, **{"fitins.config": fit})
    assert training_round(collect, secagg=True) == 3
    # the round counted is the one the run's ClientApp trains for, whatever else is sent
    fresh = ConfigRecord({"server-round": 9})
    decoy = stage(Stage.COLLECT_MASKED_VECTORS, **{"fitins.config": fit, "config": fresh})
    assert training_round(decoy, secagg=True) == 3
    plain = Message(RecordDict({"config": ConfigRecord({"server-round": 2})}), 1, "train")
    assert (training_round(plain, secagg=False), secagg_stage(plain)) == (2, None)
