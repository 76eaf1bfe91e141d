"""`fedmodel server ...`: the operator's commands (`fedmodel run` is in run.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmodel.errors import ExitCode

console = Console(highlight=False, emoji=False, soft_wrap=True)  # paths stay greppable
err_console = Console(stderr=True, highlight=False, emoji=False, soft_wrap=True)

server_app = typer.Typer(
    help="Run a federation server: certificates, SuperLink, node enrollment and revocation.",
    no_args_is_help=True,
)

DirOption = Annotated[Path, typer.Option("--dir", help="Federation directory.")]


@server_app.command("init")
def init(
    directory: DirOption,
    address: Annotated[
        str, typer.Option(help="Host name(s)/IP(s) nodes dial, comma-separated; first is used.")
    ],
    fleet_port: Annotated[int, typer.Option(help="Fleet API port (open it to nodes).")] = 9092,
    control_port: Annotated[int, typer.Option(help="Control API port (127.0.0.1 only).")] = 9093,
    bind: Annotated[
        str | None,
        typer.Option(help="Address the Fleet API listens on (default: the first --address)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace existing keys and certificates.")] = False,
) -> None:
    """Create the federation's CA, server certificate and federation.toml."""
    from server.superlink import init_federation

    federation, fingerprint = init_federation(
        directory, address.split(","), fleet_port, control_port, bind, force
    )
    console.print(f"Federation directory {federation.directory}")
    console.print(f"  nodes dial      {federation.fleet_address} (open this TCP port to them)")
    console.print(f"  Fleet API binds {federation.fleet_bind}")
    console.print(f"  Control API     {federation.control_address} (local only)")
    console.print(f"  CA fingerprint  {fingerprint}")
    console.print(f"Next: fedmodel server start --dir {directory}")


@server_app.command("start")
def start(
    directory: DirOption,
    insecure: Annotated[
        bool, typer.Option(help="Run WITHOUT TLS and node authentication (testing only).")
    ] = False,
    detach: Annotated[bool, typer.Option(help="Start in the background and return.")] = False,
) -> None:
    """Run the SuperLink: TLS, node authentication, Fleet API on the configured address."""
    from server.enrollment import parse_refusal, record_refusals
    from server.superlink import Federation, follow_log, start_superlink, stop_superlink

    federation = Federation.load(directory)
    log_path = federation.path("superlink.log")
    offset = log_path.stat().st_size if log_path.exists() else 0
    process = start_superlink(federation, insecure)
    if insecure:
        err_console.print(
            "[bold red]WARNING: --insecure: no TLS and NO node authentication. Traffic is "
            "plaintext and ANY process that reaches the Fleet port can join and receive the "
            "model. Never use this outside a test.[/bold red]"
        )
    console.print(
        f"SuperLink running (pid {process.pid}): Fleet API {federation.fleet_bind}"
        + ("" if insecure else " over TLS with node authentication")
        + f", Control API {federation.control_address}; log {federation.path('superlink.log')}"
    )
    if detach:
        console.print(f"Stop it with: fedmodel server stop --dir {directory}")
        return

    def on_line(line: str) -> None:
        console.out(line)
        if parse_refusal(line) is not None:
            record_refusals(federation)

    try:
        console.print("Press Ctrl-C to stop.")
        code = follow_log(federation, process, on_line, offset)
    except KeyboardInterrupt:
        stop_superlink(federation, process.pid)
        record_refusals(federation)
        console.print("SuperLink stopped.")
        return
    record_refusals(federation)
    if code != 0:
        raise typer.Exit(code)


@server_app.command("stop")
def stop(directory: DirOption) -> None:
    """Stop a SuperLink started with --detach."""
    from server.enrollment import record_refusals
    from server.superlink import Federation, stop_superlink

    federation = Federation.load(directory)
    stopped = stop_superlink(federation)
    record_refusals(federation)
    console.print("SuperLink stopped." if stopped else "No SuperLink was running.")


@server_app.command("status")
def status(directory: DirOption) -> None:
    """Whether the SuperLink runs and answers, how many nodes are online, and what is wrong:
    insecure mode, certificates expired or expiring within 30 days (exit 1 on an error)."""
    from server.enrollment import list_nodes, record_refusals
    from server.superlink import (
        Federation,
        certificate_problems,
        is_healthy,
        runs_insecure,
        superlink_pid,
    )

    federation = Federation.load(directory)
    pid = superlink_pid(federation)
    insecure = runs_insecure(federation)
    healthy = is_healthy(federation, insecure)
    record_refusals(federation)
    console.print(
        f"SuperLink: {f'running (pid {pid})' if pid else 'not running'}, "
        f"Control API {'answering' if healthy else 'not answering'}; "
        f"nodes dial {federation.fleet_address}"
    )
    if insecure:
        err_console.print(
            "warning: the SuperLink runs with --insecure: no TLS and no node authentication"
        )
    problems = certificate_problems(federation)
    for level, line in problems:
        err_console.print(f"{level}: {line}")
    if healthy and not insecure:
        nodes = list_nodes(federation)
        online = sum(node["status"] == "online" for node in nodes)
        console.print(f"Nodes: {len(nodes)} enrolled, {online} online")
    if (not pid and not healthy) or any(level == "error" for level, _ in problems):
        raise typer.Exit(ExitCode.FAILED)


@server_app.command("renew-cert")
def renew_cert(directory: DirOption) -> None:
    """Reissue the SuperLink's TLS certificate (new key, 397 days) from the federation's CA.

    The CA stays the same, so join bundles and nodes need no change; restart the
    SuperLink to serve the new certificate.
    """
    from server.enrollment import append_audit, registry_lock
    from server.superlink import Federation, renew_certificate, superlink_pid

    federation = Federation.load(directory)
    expires = renew_certificate(federation)
    with registry_lock(federation):
        append_audit(federation, "certificate-renewed", expires=expires.isoformat())
    console.print(
        f"New server certificate {federation.path('server.pem')}, valid until "
        f"{expires:%Y-%m-%d}; same CA, so join bundles stay valid"
    )
    if superlink_pid(federation) is not None:
        console.print(
            "The running SuperLink still serves the old certificate: restart it with "
            f"'fedmodel server stop --dir {directory}' and 'fedmodel server start --dir "
            f"{directory}'"
        )


@server_app.command("enroll")
def enroll(
    public_key: Annotated[Path, typer.Argument(help="The node's node.pub (from client init).")],
    name: Annotated[str, typer.Option(help="Name of the node, e.g. hospital-a.")],
    directory: DirOption = Path("."),
    output: Annotated[
        Path | None, typer.Option(help="Join bundle path (default DIR/bundles/NAME.join).")
    ] = None,
    max_rows: Annotated[
        int | None,
        typer.Option(min=1, help="Cap on the rows this node's update may weigh in aggregation."),
    ] = None,
) -> None:
    """Admit a node's public key and write the join bundle to send back to its owner."""
    from server.enrollment import enroll_node, record_refusals
    from server.superlink import Federation

    federation = Federation.load(directory)
    record_refusals(federation)
    entry, bundle = enroll_node(federation, public_key, name, output, max_rows)
    console.print(
        f"Enrolled '{name}' as node {entry['node_id']}, key {entry['fingerprint']}"
        + ("" if max_rows is None else f", weight capped at {max_rows} rows")
    )
    console.print(f"Join bundle: {bundle} (send it to the node's owner; it holds no secret)")


@server_app.command("nodes")
def nodes(directory: DirOption) -> None:
    """Enrolled nodes and their status (online, offline, registered, revoked)."""
    from server.enrollment import list_nodes, record_refusals
    from server.superlink import Federation

    federation = Federation.load(directory)
    record_refusals(federation)
    table = Table(title="Nodes", title_justify="left")
    for column in ("name", "node id", "status", "max rows", "key fingerprint", "enrolled"):
        table.add_column(column)
    for node in list_nodes(federation):
        max_rows = node.get("max_rows")
        table.add_row(
            node["name"], node["node_id"], node["status"],
            "-" if max_rows is None else str(max_rows), node["fingerprint"], node["enrolled_at"],
        )  # fmt: skip
    console.print(table)


@server_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="Name given at enrollment.")],
    directory: DirOption = Path("."),
) -> None:
    """Cut a node off now; its key can never join again."""
    from server.enrollment import record_refusals, revoke_node
    from server.superlink import Federation

    federation = Federation.load(directory)
    record_refusals(federation)
    entry = revoke_node(federation, name)
    console.print(f"Revoked '{name}' (node {entry['node_id']}); it is disconnected now.")


@server_app.command("audit")
def audit(
    directory: DirOption,
    anchor: Annotated[
        str | None,
        typer.Option(help="A head printed earlier (N:SHA256): check the log still holds it."),
    ] = None,
) -> None:
    """Print the audit log (enrollments, revocations, refused connections), verified:
    chain, MACs under DIR/audit.key, the recorded head and, if given, your own anchor."""
    from server.enrollment import record_refusals, verify_audit
    from server.superlink import Federation

    federation = Federation.load(directory)
    record_refusals(federation)
    events, head = verify_audit(federation, anchor)
    for event in events:
        details = {k: v for k, v in event.items() if k not in ("time", "event", "previous")}
        console.print(f"{event['time']}  {event['event']:<9} {details}")
    if head:
        console.print(f"Verified. Head {head}: keep it off this host and check later with --anchor")
