"""`fedmodel client ...`: the data owner's commands (identity, and joining a federation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(highlight=False, soft_wrap=True)  # long paths stay greppable

client_app = typer.Typer(
    help="Join a federation as a data owner: node identity and SuperNode.",
    no_args_is_help=True,
)

NodeDir = Annotated[Path, typer.Option("--dir", help="Node directory (holds the node key).")]


@client_app.command("init")
def init(
    directory: NodeDir,
    force: Annotated[bool, typer.Option(help="Replace an existing key (re-enroll after).")] = False,
) -> None:
    """Create this node's key pair and print its fingerprint."""
    from client.identity import init_node

    identity = init_node(directory, force)
    console.print(f"Node key created: {identity.private_key} (private, mode 0600, keep it here)")
    console.print(f"Public key:       {identity.public_key}")
    console.print(f"Fingerprint:      {identity.fingerprint}")
    console.print(
        "Send the public key to the federation operator and confirm the fingerprint with "
        "them by phone or in person; they send back a join bundle."
    )


@client_app.command("start")
def start(
    directory: NodeDir,
    join: Annotated[Path, typer.Option(help="Join bundle from the operator.")],
    data: Annotated[Path, typer.Option(help="Local CSV or Parquet file (never leaves here).")],
    label: Annotated[str, typer.Option(help="Name of the binary label column.")],
    budget_epsilon: Annotated[
        float | None, typer.Option(help="Your privacy budget (epsilon) for this dataset.")
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
) -> None:
    """Check the data and bundle, then run a SuperNode that trains on the local file."""
    from client.identity import load_join_bundle, node_identity
    from client.supernode import (
        SUPERNODE_EXITING,
        NodeLaunch,
        SuperNodeError,
        check_device,
        explain_exit,
        start_supernode,
    )
    from fedmodel.data import load_table
    from fedmodel.processes import follow_log, stop_group

    if insecure:
        console.print("[bold red]WARNING: --insecure: plaintext, no node key sent.[/bold red]")
    identity = node_identity(directory)
    bundle = load_join_bundle(join, identity)
    table = load_table(data, label)  # fails here, before any connection, on a bad file
    check_device(device)
    if budget_epsilon is not None and not budget_epsilon > 0:
        raise SuperNodeError(f"--budget-epsilon must be positive (got {budget_epsilon})")
    console.print(
        f"{data}: {len(table)} rows, {table.num_features} features, "
        f"{int(table.labels.sum())} positive '{label}'"
    )
    console.print(
        f"Joining {bundle.fleet_address} as '{bundle.node_name}' "
        f"(CA {bundle.ca_fingerprint[:23]}...); device {device}"
    )
    launch = NodeLaunch(
        directory=directory.absolute(),
        identity=identity,
        bundle=bundle,
        data_path=data.absolute(),
        label=label,
        device=device,
        budget_epsilon=budget_epsilon,
        port=port,
        insecure=insecure,
        max_wait_time=max_wait_time,
    )
    offset = launch.log_path.stat().st_size if launch.log_path.exists() else 0
    process = start_supernode(launch)
    try:
        code = follow_log(launch.log_path, process, console.out, offset, SUPERNODE_EXITING)
    except KeyboardInterrupt:
        stop_group(process.pid)
        console.print("SuperNode stopped.")
        return
    # Flower exits 0 when the SuperLink unregisters the node: that is not a success here.
    with launch.log_path.open(errors="replace") as log:
        log.seek(offset)
        raise SuperNodeError(f"the SuperNode stopped (exit {code}): {explain_exit(log.read())}")
