"""`fedmodel client ...`: the data owner's commands (identity, policy, approvals, joining)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from client.policy import OwnerPolicy

console = Console(highlight=False, emoji=False, soft_wrap=True)  # paths stay greppable

client_app = typer.Typer(
    help="Join a federation as a data owner: node identity, policy, approvals and SuperNode.",
    no_args_is_help=True,
)

NodeDir = Annotated[Path, typer.Option("--dir", help="Node directory (holds the node key).")]
TaskName = Annotated[str, typer.Argument(help="Installed task, e.g. fedmodel-tabular.")]
# The owner's policy options; init and start both take them (None: keep what is set)
POLICY = "Owner policy (kept in policy.json; unset options keep their value)"


def _policy_option(help: str, *flags: str) -> Any:
    """An owner-policy option: None (unset) keeps the value policy.json holds."""
    return typer.Option(*flags, help=help, rich_help_panel=POLICY)


BudgetEpsilon = Annotated[
    float | None, _policy_option("Your privacy budget (epsilon) for this dataset.")
]
BudgetDelta = Annotated[
    float | None, _policy_option("Your delta; runs asking for more are refused (default 1e-5).")
]
AllowNoDp = Annotated[
    bool | None,
    _policy_option(
        "Serve runs without DP-SGD (default: require it).", "--allow-no-dp/--require-dp"
    ),
]
RequireSecAgg = Annotated[
    bool | None,
    _policy_option(
        "Serve only runs with secure aggregation, fedmodel run --secagg (default: not required).",
        "--require-secagg/--allow-plain-aggregation",
    ),
]
AcceptDistributedDp = Annotated[
    bool | None,
    _policy_option(
        "Serve runs with distributed DP, fedmodel run --dp distributed: no DP-SGD, this node "
        "clips and noises its whole update under SecAgg+ (default: refuse).",
        "--accept-distributed-dp/--refuse-distributed-dp",
    ),
]
RequireDistributedDp = Annotated[
    bool | None,
    _policy_option(
        "Serve only runs with distributed DP (default: not required).",
        "--require-distributed-dp/--allow-other-dp-modes",
    ),
]
MinDistributedNoise = Annotated[
    float | None,
    _policy_option("Least --distributed-noise a distributed-DP run may ask for (default 0)."),
]
DistributedNoiseShares = Annotated[
    int | None,
    _policy_option(
        "Clients' noise (this node's included) the ledger counts on in each distributed-DP "
        "sum; it charges each round as if only these protected it (default 1: its own)."
    ),
]
MaxEpochs = Annotated[int | None, _policy_option("Most local epochs per round (default 5).")]
MaxRounds = Annotated[int | None, _policy_option("Most rounds per run (default 100).")]
ReleaseStatistics = Annotated[
    bool | None,
    _policy_option("Release per-column sums for the query round, not DP (default: release)."),
]
ReleaseEvaluation = Annotated[
    bool | None,
    _policy_option("Release metrics of global models on held-out rows (default: release)."),
]
ReleaseTrainLoss = Annotated[
    bool | None, _policy_option("Release each round's training loss (default: withhold).")
]

POLICY_OPTIONS: dict[str, Any] = {
    "budget_epsilon": BudgetEpsilon,
    "budget_delta": BudgetDelta,
    "allow_no_dp": AllowNoDp,
    "require_secagg": RequireSecAgg,
    "accept_distributed_dp": AcceptDistributedDp,
    "require_distributed_dp": RequireDistributedDp,
    "min_distributed_noise": MinDistributedNoise,
    "distributed_noise_shares": DistributedNoiseShares,
    "max_local_epochs": MaxEpochs,
    "max_rounds": MaxRounds,
    "release_statistics": ReleaseStatistics,
    "release_evaluation": ReleaseEvaluation,
    "release_train_loss": ReleaseTrainLoss,
}


def _with_policy_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the owner-policy options; it receives those set as `policy_changes`.

    `init` and `start` both take the policy, declared once here.
    """
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name != "policy_changes"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=option, default=None)
        for name, option in POLICY_OPTIONS.items()
    ]

    @functools.wraps(command)
    def with_policy(**options: Any) -> None:
        values = {name: options.pop(name) for name in POLICY_OPTIONS}
        command(**options, policy_changes=_policy_changes(**values))

    with_policy.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
    return with_policy


def _policy_changes(
    budget_epsilon: float | None,
    budget_delta: float | None,
    allow_no_dp: bool | None,
    require_secagg: bool | None,
    accept_distributed_dp: bool | None,
    require_distributed_dp: bool | None,
    min_distributed_noise: float | None,
    distributed_noise_shares: int | None,
    max_local_epochs: int | None,
    max_rounds: int | None,
    release_statistics: bool | None,
    release_evaluation: bool | None,
    release_train_loss: bool | None,
) -> dict[str, Any]:
    """The policy fields the owner set on this command line."""
    changes = {
        "budget_epsilon": budget_epsilon,
        "budget_delta": budget_delta,
        "require_dp": None if allow_no_dp is None else not allow_no_dp,
        "require_secagg": require_secagg,
        "accept_distributed_dp": accept_distributed_dp,
        "require_distributed_dp": require_distributed_dp,
        "min_distributed_noise": min_distributed_noise,
        "distributed_noise_shares": distributed_noise_shares,
        "max_local_epochs": max_local_epochs,
        "max_rounds": max_rounds,
        "release_statistics": release_statistics,
        "release_evaluation": release_evaluation,
        "release_train_loss": release_train_loss,
    }
    return {key: value for key, value in changes.items() if value is not None}


def _changed_policy(directory: Path, changes: dict[str, Any]) -> OwnerPolicy | None:
    """The node's policy with `changes` applied (checked, not saved); None if it has none."""
    from client.policy import OwnerPolicy, PolicyError, load_policy, policy_path

    if policy_path(directory).exists():
        return load_policy(directory).replace(**changes)
    if "budget_epsilon" in changes:
        return OwnerPolicy(**changes)
    if changes:
        raise PolicyError("a new policy needs your budget: add --budget-epsilon E")
    return None


def _show_policy(policy: OwnerPolicy) -> None:
    console.print(
        f"Policy: budget epsilon {policy.budget_epsilon:g} at delta {policy.budget_delta:g}; "
        f"DP-SGD {'required' if policy.require_dp else 'optional'}; secure aggregation "
        f"{'required' if policy.require_secagg else 'optional'}; distributed DP "
        f"{_distributed_dp_stance(policy)}; at most {policy.max_local_epochs} local epochs "
        f"and {policy.max_rounds} rounds per run"
    )
    released = [
        f"counts rounded to {policy.count_rounding}",
        "training loss" if policy.release_train_loss else "no training loss",
        "evaluation metrics" if policy.release_evaluation else "no evaluation metrics",
        "feature statistics (not DP)" if policy.release_statistics else "no feature statistics",
    ]
    console.print("Releases: " + ", ".join(released))


def _distributed_dp_stance(policy: OwnerPolicy) -> str:
    if not (policy.accept_distributed_dp or policy.require_distributed_dp):
        return "refused"
    stance = "required" if policy.require_distributed_dp else "accepted"
    if policy.min_distributed_noise > 0:
        stance += f" (noise at least {policy.min_distributed_noise:g})"
    shares = policy.distributed_noise_shares
    return stance + f", charged counting {shares} noise share{'s' if shares > 1 else ''}"


@client_app.command("init")
@_with_policy_options
def init(
    directory: NodeDir,
    force: Annotated[bool, typer.Option(help="Replace an existing key (re-enroll after).")] = False,
    *,
    policy_changes: dict[str, Any],
) -> None:
    """Create this node's key pair, approve FedModel's installed task, set the policy."""
    from client.identity import init_node
    from client.policy import save_policy
    from client.tasks import BUILTIN_TASK, approve

    policy = _changed_policy(directory, policy_changes)  # a mistake stops before any key is made
    identity = init_node(directory, force)
    console.print(f"Node key created: {identity.private_key} (private, mode 0600, keep it here)")
    console.print(f"Public key:       {identity.public_key}")
    console.print(f"Fingerprint:      {identity.fingerprint}")
    approved = approve(directory, BUILTIN_TASK)
    console.print(
        f"Approved task {approved.name} {approved.version} (source SHA-256 "
        f"{approved.sha256[:16]}...): the only code this node runs"
    )
    if policy is not None:
        save_policy(directory, policy)
        _show_policy(policy)
    console.print(
        "Send the public key to the federation operator and confirm the fingerprint with "
        "them by phone or in person; they send back a join bundle."
    )


@client_app.command("status")
def status(directory: NodeDir) -> None:
    """Show this node's policy, approved tasks, and whether it is running."""
    from client.identity import node_identity, pinned_ca_fingerprint
    from client.policy import load_policy
    from client.supernode import running_process

    identity = node_identity(directory)
    console.print(f"Node {directory}: key fingerprint {identity.fingerprint}")
    pinned = pinned_ca_fingerprint(directory)
    console.print(
        f"Federation CA pinned: {pinned}"
        if pinned
        else "No federation CA pinned yet: the first 'client start' needs --ca-fingerprint"
    )
    for name, program in (("SuperNode", "flower-supernode"), ("Executor", "client.executor")):
        pid = running_process(directory, program)
        console.print(f"{name}: " + (f"running (pid {pid})" if pid else "not running"))
    policy = load_policy(directory)
    _show_policy(policy)
    console.print(
        f"Privacy ledger: {policy.ledger_entries} entries recorded (chain head "
        f"{policy.ledger_head[:16]}...); start checks the ledger still extends it"
    )
    _show_approvals(directory)


@client_app.command("policy")
@_with_policy_options
def policy(directory: NodeDir, *, policy_changes: dict[str, Any]) -> None:
    """Change this node's policy, running or not: it applies from the node's next message."""
    from client.policy import PolicyError, save_policy

    changed = _changed_policy(directory, policy_changes)
    if changed is None:
        raise PolicyError(
            f"{directory} has no owner policy yet; set one with "
            f"'fedmodel client init --dir {directory} --budget-epsilon E'"
        )
    save_policy(directory, changed)
    _show_policy(changed)


def _show_approvals(directory: Path) -> None:
    from client.tasks import approval_refusal, load_approvals

    approvals = load_approvals(directory)
    if not approvals:
        console.print(
            "No approved tasks: this node runs nothing "
            f"(fedmodel client approve --dir {directory} TASK)"
        )
    for approved in approvals:
        problem = approval_refusal(approvals, approved.name, approved.version)
        state = "ok" if problem is None else f"REFUSED: {problem}"
        console.print(
            f"Approved: {approved.name} {approved.version}  sha256 {approved.sha256}  "
            f"since {approved.approved_at}  ({state})"
        )


@client_app.command("approve")
def approve_task(directory: NodeDir, name: TaskName) -> None:
    """Approve an installed task as its source is now (after reviewing it)."""
    from client.tasks import approve

    approved = approve(directory, name)
    console.print(f"Approved {approved.name} {approved.version}: source SHA-256 {approved.sha256}")


@client_app.command("tasks")
def tasks(directory: NodeDir) -> None:
    """List the tasks installed here (pip packages' fedmodel.tasks entry points included),
    with their version and whether the owner's approval covers their source as it is."""
    from client.tasks import approval_refusal, installed_tasks, load_approvals

    approvals = load_approvals(directory)
    for task in installed_tasks().values():
        problem = approval_refusal(approvals, task.name, task.version)
        state = "approved" if problem is None else f"NOT APPROVED: {problem}"
        console.print(f"{task.name} {task.version}  ({state})")


@client_app.command("approvals")
def approvals(directory: NodeDir) -> None:
    """List the approved tasks, and whether their installed source still matches."""
    _show_approvals(directory)


@client_app.command("revoke-approval")
def revoke_approval(directory: NodeDir, name: TaskName) -> None:
    """Withdraw the approval of a task: runs asking for it are refused from now on."""
    from client.tasks import revoke_approval as withdraw

    for withdrawn in withdraw(directory, name):
        console.print(f"Withdrawn: {withdrawn.name} {withdrawn.version}")


@client_app.command("start")
@_with_policy_options
def start(
    directory: NodeDir,
    join: Annotated[Path, typer.Option(help="Join bundle from the operator.")],
    data: Annotated[
        Path,
        typer.Option(
            help="Local CSV or Parquet file (never leaves here); for an installed task, the "
            "file or directory its local_data reads."
        ),
    ],
    label: Annotated[
        str | None,
        typer.Option(
            help="Name of the binary label column, for FedModel's tabular task (without it, "
            "the node serves installed tasks only)."
        ),
    ] = None,
    ca_fingerprint: Annotated[
        str | None,
        typer.Option(
            help="The federation CA's SHA-256 fingerprint as the operator read it out to you "
            "(needed on the first join; pinned in the node directory after)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda:N.")] = "auto",
    port: Annotated[
        int, typer.Option(help="Local runtime API port on 127.0.0.1 (0: any free port).")
    ] = 0,
    max_wait_time: Annotated[
        float | None, typer.Option(help="Give up connecting after this many seconds.")
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Connect WITHOUT TLS (only to test a refusal).", hidden=True)
    ] = False,
    *,
    policy_changes: dict[str, Any],
) -> None:
    """Check the data, bundle and policy, then serve the federation from the local file."""
    from client.identity import node_identity, trusted_join_bundle
    from client.ledger_guard import check_ledger
    from client.policy import PolicyError, save_policy
    from client.supernode import (
        SUPERNODE_EXITING,
        NodeLaunch,
        SuperNodeError,
        check_device,
        explain_exit,
        start_node,
    )
    from fedmodel.errors import DataError
    from fedmodel.local_tables import load_table
    from fedmodel.runtime.processes import follow_log, free_port, stop_group

    if insecure:
        console.print("[bold red]WARNING: --insecure: plaintext, no node key sent.[/bold red]")
    identity = node_identity(directory)
    bundle = trusted_join_bundle(join, identity, directory, ca_fingerprint)
    table = None if label is None else load_table(data, label)  # fails before connecting
    if not data.exists():  # an installed task's local_data reads it, file or directory
        raise DataError(f"data file {data} does not exist")
    check_device(device)
    policy = _changed_policy(directory, policy_changes)
    if policy is None:
        raise PolicyError(
            "this node has no privacy budget yet: add --budget-epsilon E (your epsilon for "
            "this dataset, over every run)"
        )
    if table is not None:
        console.print(
            f"{data}: {len(table)} rows, {table.num_features} features, "
            f"{int(table.labels.sum())} positive '{label}'"
        )
    launch = NodeLaunch(
        directory=directory.absolute(),
        identity=identity,
        bundle=bundle,
        data_path=data.absolute(),
        label=label or "",
        device=device,
        port=port or free_port(),
        insecure=insecure,
        max_wait_time=max_wait_time,
    )
    check_ledger(directory, policy)  # a missing or cut ledger would reset the budget
    save_policy(directory, policy)
    _show_policy(policy)
    console.print(
        f"Joining {bundle.fleet_address} as '{bundle.node_name}', trusting the pinned CA "
        f"{bundle.ca_fingerprint}; device {device}"
    )
    offset = launch.log_path.stat().st_size if launch.log_path.exists() else 0
    supernode, executor = start_node(launch)
    try:
        code = follow_log(launch.log_path, supernode, console.out, offset, SUPERNODE_EXITING)
    except KeyboardInterrupt:
        stop_group(supernode.pid)
        stop_group(executor.pid)
        console.print("SuperNode stopped.")
        return
    if executor.poll() not in (None, 0):
        raise SuperNodeError(
            f"the node executor failed (exit {executor.returncode}); its log is "
            f"{launch.executor_log_path}"
        )
    stop_group(executor.pid)
    # Flower exits 0 when the SuperLink unregisters the node: that is not a success here.
    with launch.log_path.open(errors="replace") as log:
        log.seek(offset)
        raise SuperNodeError(f"the SuperNode stopped (exit {code}): {explain_exit(log.read())}")
