"""Keeps a deployed node's privacy ledger from silently shrinking, and its rounds unique.

The ledger's hash chain shows an edited entry, but not a deleted file or a cut tail:
either would hand the node a fresh budget. So after every round it trains, the node
writes the ledger's chain head (entry count and last hash) into the owner's policy
file, and it refuses to start on a ledger that is missing, shorter than that head, or
whose entry at the head's position carries another hash. A ledger longer than the head
is fine (the node stopped between a round and the head's update).

The ledger also names every (run, round) the node trained: a second train request for
one of them - a coordinator replaying a round to average away the noise - is refused.
A distributed-DP round is in it too: the owner's budget pays for it before its noisy
update leaves (client.app.charge_distributed_round).
"""

from __future__ import annotations

from pathlib import Path

from client.policy import OwnerPolicy, PolicyError, load_policy, save_policy
from fedmodel.config import RunConfig
from fedmodel.privacy.ledger import PrivacyLedger
from fedmodel.privacy.ledger_chain import verify_chain

LEDGER_FILE = "privacy-ledger.sqlite"
REPLAYED_ROUND = "replayed-round"


def ledger_path(directory: Path) -> Path:
    return directory / LEDGER_FILE


def ledger_run_id(config: RunConfig, flower_run_id: int) -> str:
    """The run a ledger entry belongs to: the run config's run-uid (it survives a server
    restart with --resume), else Flower's run id."""
    return config.run_uid or str(flower_run_id)


def check_ledger(directory: Path, policy: OwnerPolicy) -> None:
    """Raise PolicyError when the ledger does not extend the head the policy recorded."""
    path = ledger_path(directory)
    restore = f"restore {path} from your backup; the node will not start without it"
    if policy.ledger_entries == 0:
        return
    if not path.is_file():
        raise PolicyError(
            f"{path} is missing, but this node's policy records {policy.ledger_entries} "
            f"ledger entries: a deleted ledger would reset the privacy budget; {restore}"
        )
    ledger = PrivacyLedger(path)
    count, _ = ledger.head()
    if count < policy.ledger_entries:
        raise PolicyError(
            f"{path} holds {count} entries, but this node's policy records "
            f"{policy.ledger_entries}: a truncated ledger would undercount the budget; {restore}"
        )
    if ledger.entry_hash(policy.ledger_entries) != policy.ledger_head:
        raise PolicyError(
            f"{path}: entry #{policy.ledger_entries} is not the one this node recorded: "
            f"the ledger was replaced or rewritten; {restore}"
        )
    problem = verify_chain(ledger.entries())
    if problem is not None:
        raise PolicyError(f"{path}: entry #{problem.seq} {problem.reason}; {restore}")


def record_head(directory: Path) -> None:
    """Write the ledger's current chain head into the owner's policy file."""
    path = ledger_path(directory)
    if not path.is_file():
        return
    count, head = PrivacyLedger(path).head()
    policy = load_policy(directory)
    if (count, head) != (policy.ledger_entries, policy.ledger_head):
        save_policy(directory, policy.replace(ledger_entries=count, ledger_head=head))


def replay_refusal(directory: Path, run_id: str, server_round: int) -> str | None:
    """Why a train request for (run, round) is refused when the node already trained it."""
    path = ledger_path(directory)
    seq = PrivacyLedger(path).trained_round(run_id, server_round) if path.is_file() else None
    if seq is None:
        return None
    return (
        f"{REPLAYED_ROUND}: round {server_round} of run {run_id} was already trained on "
        f"this node (ledger entry #{seq}); each round is trained once"
    )
