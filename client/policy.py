"""The data owner's policy: what this node agrees to do, whatever the coordinator asks.

Everything a run carries (its run config, its messages, its app bundle) is a request
from the coordinator. The policy, set by the owner with `fedmodel client init/start`
and kept in NODE/policy.json (0600), decides which requests the node serves:
- DP-SGD is required unless the owner allowed otherwise (`--allow-no-dp`);
- distributed DP (`--dp distributed`: no DP-SGD, the node clips and noises its whole
  update under SecAgg+) is refused unless the owner accepted it
  (`--accept-distributed-dp`), with a noise multiplier of at least the owner's
  (`--min-distributed-noise`); an owner may require it (`--require-distributed-dp`),
  and the node then serves no other mode. Each distributed round is charged to the
  owner's budget as if only `--distributed-noise-shares` clients' noise (default 1:
  this node's own) protected the sum, whatever cohort the coordinator claims;
- secure aggregation (SecAgg+) is required if the owner asked for it (`--require-secagg`):
  the coordinator then sees only the sum of the nodes' updates, never this node's;
- the owner's budget epsilon, at the owner's delta, caps everything ever spent on the
  data; a run whose delta is above the owner's is refused, and the node accounts at
  the owner's delta, never at the run's;
- local epochs and rounds per run are bounded;
- only installed tasks the owner approved, with the source they had when approved, run
  (client/tasks.py keeps the approvals, in NODE/approvals.json);
- what leaves the node besides DP-protected weights is the owner's choice: example
  counts rounded, training loss withheld, evaluation and feature statistics allowed.
A refusal is an answer (an error reply with a reason), never a crash.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, MessageType

from client.tasks import BUILTIN_TASK, approval_refusal, load_approvals
from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError, ExitCode, FedModelError
from fedmodel.pki import write_private_file
from fedmodel.privacy.ledger_chain import GENESIS_HASH

POLICY_FILE = "policy.json"


class PolicyError(FedModelError):
    """A missing or invalid owner policy file, or an invalid policy option."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class OwnerPolicy:
    """What this node agrees to; every field is the owner's, none the coordinator's."""

    budget_epsilon: float
    budget_delta: float = 1e-5
    require_dp: bool = True
    require_secagg: bool = False
    accept_distributed_dp: bool = False
    require_distributed_dp: bool = False  # implies accepting it
    min_distributed_noise: float = 0.0  # the least --distributed-noise served
    # the clients' noise (this node's included) the ledger counts on in each distributed sum
    distributed_noise_shares: int = 1
    max_local_epochs: int = 5
    max_rounds: int = 100
    release_statistics: bool = True  # query round: column sums (not DP-protected)
    release_evaluation: bool = True  # metrics of global models on held-out rows
    release_train_loss: bool = False
    count_rounding: int = 10  # example counts leave the node rounded to this
    # Not options but the ledger's chain head, kept here, outside the ledger, so that a
    # deleted or truncated ledger is noticed (client/ledger_guard.py)
    ledger_entries: int = 0
    ledger_head: str = GENESIS_HASH

    def __post_init__(self) -> None:
        checks = {
            "budget epsilon must be a positive number (--budget-epsilon)": math.isfinite(
                self.budget_epsilon
            )
            and self.budget_epsilon > 0,
            "budget delta must be between 0 and 1 (--budget-delta)": 0 < self.budget_delta < 1,
            "min distributed noise must be 0 or a positive number (--min-distributed-noise)": (
                math.isfinite(self.min_distributed_noise) and self.min_distributed_noise >= 0
            ),
            "distributed noise shares must be at least 1 (--distributed-noise-shares)": (
                self.distributed_noise_shares >= 1
            ),
            "max local epochs must be at least 1 (--max-local-epochs)": self.max_local_epochs >= 1,
            "max rounds must be at least 1 (--max-rounds)": self.max_rounds >= 1,
            "count rounding must be at least 1 (--count-rounding)": self.count_rounding >= 1,
        }
        for message, ok in checks.items():
            if not ok:
                raise PolicyError(message)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> OwnerPolicy:
        return cls(**json.loads(text))

    def replace(self, **changes: Any) -> OwnerPolicy:
        return dataclasses.replace(self, **changes)


def policy_path(directory: Path) -> Path:
    return directory / POLICY_FILE


def load_policy(directory: Path) -> OwnerPolicy:
    path = policy_path(directory)
    if not path.exists():
        raise PolicyError(
            f"{directory} has no owner policy ({POLICY_FILE}); set one with "
            f"'fedmodel client init --dir {directory} --budget-epsilon E'"
        )
    try:
        return OwnerPolicy.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as error:
        raise PolicyError(f"{path} is not a valid owner policy ({error}); rewrite it with "
                          "'fedmodel client init --force-policy ...'") from None  # fmt: skip


def save_policy(directory: Path, policy: OwnerPolicy) -> None:
    write_private_file(policy_path(directory), policy.to_json().encode(), force=True)


def review(
    directory: Path, policy: OwnerPolicy, run_config: Mapping[str, Any], message_type: str
) -> str | None:
    """Why this node refuses the request, or None when the owner's policy allows it."""
    if not run_config.get("app-task"):  # a run must name the installed task it asks for
        return "the run names no task installed on this node (run config 'app-task')"
    try:
        config = RunConfig.from_run_config(run_config)
    except (ConfigError, KeyError, TypeError, ValueError) as error:
        return f"the run is not a FedModel run this node can serve ({error})"
    refusal = approval_refusal(load_approvals(directory), config.app_task, config.app_task_version)
    if refusal is not None:
        return refusal
    refusal = _dp_mode_refusal(policy, config)
    if refusal is not None:
        return refusal
    if policy.require_secagg and not config.secagg:
        return (
            "the run does not use secure aggregation, which the owner requires on this node "
            "(fedmodel run --secagg; --allow-plain-aggregation lifts it)"
        )
    if config.delta > policy.budget_delta:
        return (
            f"the run's delta {config.delta:g} is above the owner's delta {policy.budget_delta:g}"
        )
    if config.sample_dp and config.epsilon > policy.budget_epsilon:
        return (
            f"the run plans epsilon {config.epsilon:g}, above the owner's whole budget "
            f"{policy.budget_epsilon:g}"
        )
    if config.local_epochs > policy.max_local_epochs:
        return (
            f"the run asks for {config.local_epochs} local epochs; the owner allows at most "
            f"{policy.max_local_epochs}"
        )
    if config.rounds > policy.max_rounds:
        return (
            f"the run asks for {config.rounds} rounds; the owner allows at most {policy.max_rounds}"
        )
    releases_statistics = config.app_task == BUILTIN_TASK  # a user task's query: a name only
    if message_type == MessageType.QUERY and releases_statistics and not policy.release_statistics:
        return "the owner does not release feature statistics (they are not DP-protected)"
    if message_type == MessageType.EVALUATE and not policy.release_evaluation:
        return "the owner does not release evaluation metrics"
    return None


def _dp_mode_refusal(policy: OwnerPolicy, config: RunConfig) -> str | None:
    """Why the owner does not serve the run's DP mode (and its distributed noise)."""
    if policy.require_distributed_dp and not config.distributed_dp:
        return (
            f"the run asks for DP mode '{config.dp}', but the owner requires distributed DP "
            "on this node (fedmodel run --dp distributed; --allow-other-dp-modes lifts it)"
        )
    if config.distributed_dp:
        if not (policy.accept_distributed_dp or policy.require_distributed_dp):
            return (
                "the run asks for distributed DP (no DP-SGD; this node's noise is a share of "
                "the sum's), which the owner has not accepted (--accept-distributed-dp)"
            )
        if config.distributed_noise < policy.min_distributed_noise:
            return (
                f"the run's distributed noise {config.distributed_noise:g} is below the "
                f"owner's minimum {policy.min_distributed_noise:g} (--min-distributed-noise)"
            )
        return None
    if policy.require_dp and not config.sample_dp:
        return (
            f"the run asks for DP mode '{config.dp}', but the owner requires DP-SGD on this "
            "node (--allow-no-dp lifts it)"
        )
    return None


def content_refusal(message: Message) -> str | None:
    """Why the node refuses a message's model: any non-finite parameter.

    A crafted model (say, a hidden unit that overflows on one target record) is a probe
    into the data, not a model to train or score.
    """
    for name, record in message.content.array_records.items():
        for key, array in record.items():
            if not np.isfinite(array.numpy()).all():
                return (
                    f"the model sent has non-finite values (NaN or inf) in "
                    f"'{name}/{key}'; the node does not train or evaluate on it"
                )
    return None
