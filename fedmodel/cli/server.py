"""`fedmodel server ...` (the operator's commands) and `fedmodel run`."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedmodel.config import AGGREGATORS, EVALUATION_METHODS, RunConfig
from fedmodel.errors import ConfigError, ExitCode
from fedmodel.run_directory import SUMMARY_FILE

DEFAULTS = RunConfig()
console = Console(highlight=False, soft_wrap=True)  # long paths stay greppable
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

server_app = typer.Typer(
    help="Run a federation server: certificates, SuperLink, node enrollment and revocation.",
    no_args_is_help=True,
)

DirOption = Annotated[Path, typer.Option("--dir", help="Federation directory.")]
# Robust aggregation, the same options for `fedmodel run` and `fedmodel simulate`
Aggregator = Annotated[str, typer.Option(help=f"Aggregation rule: {', '.join(AGGREGATORS)}.")]
Byzantine = Annotated[int, typer.Option(help="Malicious clients per round to tolerate.")]
MaxUpdateNorm = Annotated[
    float, typer.Option(help="Reject updates farther than this from the global model (0: off).")
]


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


def run_command(
    directory: DirOption,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = DEFAULTS.rounds,
    epsilon: Annotated[
        float, typer.Option(help="Privacy budget per node for this run.")
    ] = DEFAULTS.epsilon,
    min_clients: Annotated[
        int, typer.Option(help="Nodes that must be online to start, and to go on.")
    ] = 2,
    delta: Annotated[float, typer.Option(help="DP delta per node.")] = DEFAULTS.delta,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Expected batch size.")] = DEFAULTS.batch_size,
    lr: Annotated[float, typer.Option(help="Local SGD learning rate.")] = DEFAULTS.lr,
    max_grad_norm: Annotated[
        float, typer.Option(help="Per-sample clipping norm.")
    ] = DEFAULTS.max_grad_norm,
    model: Annotated[str, typer.Option(help="Model: mlp or logreg.")] = DEFAULTS.model,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Train without DP (baseline).")] = False,
    dp: Annotated[
        str, typer.Option(help="sample (DP-SGD on nodes), client (server-side), both, off.")
    ] = DEFAULTS.dp,
    central_noise: Annotated[
        float, typer.Option(help="--dp client/both: noise multiplier per round.")
    ] = DEFAULTS.central_noise,
    central_clipping_norm: Annotated[
        float, typer.Option(help="--dp client/both: clip each node's update to this norm.")
    ] = DEFAULTS.central_clipping_norm,
    central_epsilon: Annotated[
        float, typer.Option(help="--dp client/both: client-level budget (0: none).")
    ] = DEFAULTS.central_epsilon,
    seed: Annotated[int, typer.Option(help="Seed for model initialisation.")] = DEFAULTS.seed,
    aggregator: Aggregator = DEFAULTS.aggregator,
    byzantine: Byzantine = DEFAULTS.byzantine,
    max_update_norm: MaxUpdateNorm = DEFAULTS.max_update_norm,
    evaluation: Annotated[
        str,
        typer.Option(
            help=f"How the nodes' scores combine: {', '.join(EVALUATION_METHODS)} "
            "(mean: weights capped like training's)."
        ),
    ] = DEFAULTS.evaluation,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a round's replies.")
    ] = 600.0,
    output: Annotated[
        Path | None, typer.Option(help="Run directory (default DIR/runs/<timestamp>).")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show every ServerApp log line.")] = False,
    stop_after_round: Annotated[
        int, typer.Option(help="End the run cleanly after this round; continue with --resume.")
    ] = 0,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue this run directory from its last checkpoint, with its own config "
            "(other training options are ignored)."
        ),
    ] = None,
) -> None:
    """Train on the federation's enrolled nodes (the SuperLink must be running)."""
    from fedmodel.protocol import REFUSAL_MARKER
    from server.aggregators import check_aggregator
    from server.enrollment import load_registry
    from server.launch import launch_run
    from server.resume import resume_config
    from server.superlink import Federation
    from simulations.runner import progress_line

    federation = Federation.load(directory)
    config = RunConfig(
        scenario="deployment",
        dataset="local",
        clients=min_clients,
        min_clients=min_clients,
        rounds=rounds,
        local_epochs=local_epochs,
        batch_size=batch_size,
        lr=lr,
        dp="off" if no_dp else dp,
        central_noise=central_noise,
        central_clipping_norm=central_clipping_norm,
        central_epsilon=central_epsilon,
        epsilon=epsilon,
        delta=delta,
        max_grad_norm=max_grad_norm,
        model=model,
        seed=seed,
        aggregator=aggregator,
        byzantine=byzantine,
        max_update_norm=max_update_norm,
        evaluation=evaluation,
        federation_dir=str(federation.directory),
        round_timeout=round_timeout,
        stop_after_round=stop_after_round,
        run_uid=uuid.uuid4().hex,
    )
    if resume is not None:
        config = resume_config(resume, "deployment").replace(
            federation_dir=str(federation.directory)
        )
        output = resume
    check_aggregator(config.aggregator, config.clients, config.byzantine)  # as simulate does
    run_dir = (output or federation.path("runs") / time.strftime("%Y%m%d-%H%M%S")).absolute()
    if not config.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} already exists and is not empty")
    console.print(
        ("Resuming" if config.resume else "Training")
        + f" on at least {config.min_clients} enrolled nodes for {config.rounds} rounds "
        + (
            f"under DP-SGD (epsilon {config.epsilon} per node)"
            if config.sample_dp
            else "without DP-SGD"
        )
        + (f", client-level DP (noise {config.central_noise:g})" if config.client_dp else "")
        + f"; run directory {run_dir}"
    )
    started = time.monotonic()

    def show_progress(row: dict[str, Any]) -> None:
        measures = (
            f"nodes {row['clients']}  AUROC {row['auroc']:.4f} (mean over nodes' hold-outs)  "
            f"accuracy {row['accuracy']:.4f}"
        )
        console.print(progress_line(row, measures, time.monotonic() - started))

    names = {str(entry["node_id"]): name for name, entry in load_registry(federation).items()}

    def show_log_line(line: str) -> None:
        """Every line with --verbose; otherwise the nodes' refusals, by node name."""
        if verbose:
            console.out(line)
        elif REFUSAL_MARKER in line:
            node, _, reason = line.split(REFUSAL_MARKER, 1)[1].strip().partition(":")
            console.print(f"{REFUSAL_MARKER} {names.get(node, node)}:{reason}", markup=False)

    summary = launch_run(federation, config, run_dir, show_progress, show_log_line)
    table = Table(title="Privacy spent per node", title_justify="left")
    for column in ("node", "rows", "epsilon", "delta"):
        table.add_column(column)
    for client in summary.clients:
        eps = client.get("epsilon")
        table.add_row(
            str(client.get("node", client["client"])),
            "-" if client.get("num_examples") is None else str(client["num_examples"]),
            "-" if eps is None else f"{eps:.3f}",
            "-" if client.get("delta") is None else f"{client['delta']:g}",
        )
    console.print(table)
    if summary.stopped_early:
        console.print(f"Stopped early: {summary.stopped_early}")
    console.print(f"Summary: {run_dir / SUMMARY_FILE}")
