"""The deployment benchmark's federation on 127.0.0.1, made and driven by the fedmodel CLI.

A server directory and one node directory per node under a temporary root: `fedmodel
server init/start/enroll` and `fedmodel client init/start` as README's "Try it on one
machine" shows, or the same enrolled nodes as plain `flower-supernode` processes (the
baseline), and `fedmodel run` against them. benchmarks/deployment.py measures the runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.identity import load_join_bundle, node_identity
from client.supernode import (
    NodeLaunch,
    node_config,
    node_config_toml,
    running_process,
    supernode_command,
)
from fedmodel.pki import certificate_fingerprint
from fedmodel.privacy.accounting_cache import CACHE_DIR_VARIABLE
from fedmodel.runtime.processes import (
    executable,
    free_port,
    recorded_process,
    start_detached,
    stop_group,
    tool_environment,
)

ROWS_PER_NODE = 400
LABEL = "death"
RUN_EPSILON = 50.0
BUDGET_EPSILON = 100.0  # the owner's; with empty ledgers per run it never stops one
BUDGET_DELTA = 1e-5
PROGRESS = re.compile(r"round (\d+)/(\d+) .*\b(\d+) s elapsed")
STARTED = time.monotonic()


def say(message: str) -> None:
    """A progress line on stderr: a benchmark run takes minutes."""
    print(f"[{time.monotonic() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


@dataclass
class Federation:
    """The temporary federation: server directory, node directories, started processes."""

    root: Path
    nodes: list[str]
    environment: dict[str, str]
    clients: list[subprocess.Popen[bytes]] = field(default_factory=list)  # fedmodel client start
    supernodes: list[subprocess.Popen[bytes]] = field(default_factory=list)  # flower-supernode

    @property
    def server(self) -> Path:
        return self.root / "server"

    def node_dir(self, node: str) -> Path:
        return self.root / node

    def data(self, node: str) -> Path:
        return self.root / f"{node}.csv"

    def bundle(self, node: str) -> Path:
        return self.server / "bundles" / f"{node}.join"

    @property
    def ca_fingerprint(self) -> str:
        """What `server init` printed and the operator reads out to each owner."""
        return certificate_fingerprint((self.server / "ca.crt").read_bytes())


def fedmodel(*args: str | Path | float, environment: dict[str, str], timeout: float = 180) -> str:
    """Run one fedmodel CLI command to completion; its stdout, or an error with its output."""
    command = [executable("fedmodel"), *map(str, args)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=environment, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[1:])} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result.stdout


def make_federation(federation: Federation) -> None:
    """Server init/start, the nodes' data, client init and enrollment, as README shows."""
    from fedmodel.datasets.medical import load_flchain_frame

    environment = federation.environment
    fleet_port, control_port = free_port(), free_port()
    say(f"server init (Fleet 127.0.0.1:{fleet_port}, Control 127.0.0.1:{control_port})")
    fedmodel(
        "server", "init", "--dir", federation.server, "--address", "127.0.0.1",
        "--fleet-port", fleet_port, "--control-port", control_port, environment=environment,
    )  # fmt: skip
    say("server start --detach")
    fedmodel("server", "start", "--dir", federation.server, "--detach", environment=environment)
    frame = load_flchain_frame().sample(frac=1, random_state=0)  # shipped sorted by outcome
    for number, node in enumerate(federation.nodes):
        rows = frame[number * ROWS_PER_NODE : (number + 1) * ROWS_PER_NODE]
        rows.to_csv(federation.data(node), index=False)
        say(f"client init + enroll {node} ({len(rows)} rows)")
        directory = federation.node_dir(node)
        fedmodel(
            "client", "init", "--dir", directory, "--budget-epsilon", BUDGET_EPSILON,
            environment=environment,
        )  # fmt: skip
        fedmodel(
            "server", "enroll", directory / "node.pub", "--name", node,
            "--dir", federation.server, environment=environment,
        )  # fmt: skip


def start_fedmodel_nodes(federation: Federation) -> None:
    """`fedmodel client start ... --device cpu` per node, in the background."""
    for node in federation.nodes:
        directory = federation.node_dir(node)
        command = [
            executable("fedmodel"), "client", "start", "--dir", str(directory),
            "--join", str(federation.bundle(node)), "--data", str(federation.data(node)),
            "--label", LABEL, "--device", "cpu", "--ca-fingerprint", federation.ca_fingerprint,
        ]  # fmt: skip
        federation.clients.append(
            start_detached(command, directory / "client-start.out", federation.environment)
        )


def stop_fedmodel_nodes(federation: Federation) -> None:
    """SIGTERM each `fedmodel client start` (it stops its SuperNode and executor)."""
    for process in federation.clients:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    for process in federation.clients:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop_group(process.pid)
    federation.clients.clear()
    for node in federation.nodes:  # what a CLI that did not clean up may have left
        for program in ("flower-supernode", "client.executor"):
            pid = running_process(federation.node_dir(node), program)
            if pid is not None:
                stop_group(pid)


def baseline_command(federation: Federation, node: str) -> list[str]:
    """FedModel's own `flower-supernode` command, less process isolation and the executor
    secret, with a node config that also carries the owner's budget (FedModel's executor
    injects it; without the executor the ClientApp reads it from node config)."""
    directory = federation.node_dir(node)
    identity = node_identity(directory)
    launch = NodeLaunch(
        directory=directory,
        identity=identity,
        bundle=load_join_bundle(federation.bundle(node), identity),
        data_path=federation.data(node),
        label=LABEL,
        device="cpu",
        port=free_port(),
    )
    command = supernode_command(launch)
    dropped = {"--isolation": 2, "--superexec-auth-secret-file": 2}
    kept: list[str] = []
    skip = 0
    for argument in command:
        if skip:
            skip -= 1
            continue
        if argument in dropped:
            skip = dropped[argument] - 1
            continue
        kept.append(argument)
    config = {**node_config(launch), "budget-epsilon": BUDGET_EPSILON, "budget-delta": BUDGET_DELTA}
    config_path = directory / "baseline-node-config.toml"
    config_path.write_text(node_config_toml(config), encoding="utf-8")
    kept[kept.index("--node-config") + 1] = str(config_path)
    return kept


def start_flower_nodes(federation: Federation) -> None:
    """`flower-supernode` per node in Flower's default isolation, each in its own session."""
    for node in federation.nodes:
        directory = federation.node_dir(node)
        environment = tool_environment(directory / "flwr-home")  # the FAB is installed there
        environment["CUDA_VISIBLE_DEVICES"] = ""  # as FedModel's `--device cpu` does
        environment[CACHE_DIR_VARIABLE] = federation.environment[CACHE_DIR_VARIABLE]
        federation.supernodes.append(
            start_detached(
                baseline_command(federation, node),
                directory / "baseline-supernode.log",
                environment,
                cwd=directory,
            )
        )


def stop_flower_nodes(federation: Federation) -> None:
    """SIGTERM each SuperNode's process group (its SuperExec and ClientApps with it)."""
    for process in federation.supernodes:
        stop_group(process.pid)
        process.wait()
    federation.supernodes.clear()


def online_nodes(federation: Federation) -> int:
    listing = fedmodel(
        "server", "nodes", "--dir", federation.server, environment=federation.environment
    )
    return listing.count(" online ")


def wait_for_online(federation: Federation, count: int, timeout: float = 180) -> None:
    """Until `fedmodel server nodes` shows exactly `count` nodes online."""
    deadline = time.monotonic() + timeout
    while (online := online_nodes(federation)) != count:
        for process in [*federation.clients, *federation.supernodes]:
            if process.poll() is not None:
                raise RuntimeError(
                    f"a node process (pid {process.pid}) exited {process.returncode}; see "
                    f"client-start.out and the SuperNode logs in {federation.root}/NODE (--keep)"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{online} nodes online after {timeout:.0f} s, expected {count}")
        time.sleep(1)


def wait_until_offline(federation: Federation, timeout: float = 120) -> None:
    """Until no node is online: Flower refuses a key that is still online elsewhere."""
    try:
        wait_for_online(federation, 0, timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as problem:
        say(f"warning: {problem}")


def reset_ledgers(federation: Federation) -> None:
    """Empty every node's privacy ledger (its nodes stopped), so each run starts alike."""
    for node in federation.nodes:
        for path in federation.node_dir(node).glob("privacy-ledger.sqlite*"):
            path.unlink()


def run_federation(
    federation: Federation, rounds: int, output: Path, options: Sequence[str] = ()
) -> dict[int, float]:
    """`fedmodel run` (with `options`) to completion; when each round's progress line
    arrived (monotonic)."""
    command = [
        executable("fedmodel"), "run", "--dir", str(federation.server),
        "--rounds", str(rounds), "--epsilon", str(RUN_EPSILON),
        "--min-clients", str(len(federation.nodes)), "--output", str(output), *options,
    ]  # fmt: skip
    arrived: dict[int, float] = {}
    lines: list[str] = []
    process = subprocess.Popen(
        command,
        env=federation.environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    timeout = 300 + 180 * rounds
    watchdog = threading.Timer(timeout, lambda: _terminate(process))
    watchdog.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(f"{time.monotonic() - STARTED:9.2f} {line}")
            if match := PROGRESS.search(line):
                arrived[int(match[1])] = time.monotonic()
                say(f"  {line.strip()}")
        process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            stop_group(process.pid)
    (output.parent / f"{output.name}.stamped.out").write_text("".join(lines))
    if process.returncode != 0 or len(arrived) < rounds:
        raise RuntimeError(
            f"fedmodel run exited {process.returncode} after {len(arrived)} of {rounds} "
            f"rounds (timeout {timeout} s):\n{''.join(lines[-30:])}"
        )
    return arrived


def _terminate(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)  # fedmodel run stops its flwr run on SIGTERM


@contextlib.contextmanager
def federation_on_loopback(nodes: int, keep: bool) -> Iterator[Federation]:
    """A fresh federation in a temporary directory; everything started is stopped after."""
    root = Path(tempfile.mkdtemp(prefix="fedmodel-deployment-"))
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", CACHE_DIR_VARIABLE: str(root / "cache")}
    names = [f"hospital-{letter}" for letter in string.ascii_lowercase[:nodes]]
    federation = Federation(root, names, environment)
    try:
        yield federation
    finally:
        say("cleaning up")
        with contextlib.suppress(Exception):
            stop_fedmodel_nodes(federation)
        with contextlib.suppress(Exception):
            stop_flower_nodes(federation)
        if (federation.server / "federation.toml").exists():
            with contextlib.suppress(Exception):
                fedmodel("server", "stop", "--dir", federation.server, environment=environment)
        pid_file = federation.server / "superlink.pid"
        missed = recorded_process(pid_file, "flower-superlink", federation.server)
        if missed is not None:  # a SuperLink `server stop` missed
            stop_group(missed[0])
        if keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
