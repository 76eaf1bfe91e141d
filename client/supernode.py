"""Run a Flower SuperNode for an enrolled node, on its own local data file.

The SuperNode dials the Fleet address from the join bundle over TLS, trusting only
the CA in that bundle, and signs every request with the node key. Its node config
(a TOML file, so paths need no shell quoting) tells the ClientApp which file and label
to train on, where the owner's privacy ledger is, the owner's budget and the device.
Its local runtime API listens on 127.0.0.1 only.

Both processes run in sessions of their own (so a terminal's Ctrl-C reaches only
`client start`, which stops them in order); on Linux they also die with it, should it
be killed outright (the OOM killer), instead of keeping the node key online as orphans.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from client.ledger_guard import ledger_path
from fedmodel.errors import ExitCode, FedModelError
from fedmodel.pki import JoinBundle, NodeIdentity, write_private_file, write_public_file
from fedmodel.privacy.accounting_cache import CACHE_DIR_VARIABLE
from fedmodel.protocol import DATA_PATH_KEY, LABEL_KEY, LEDGER_PATH_KEY, NODE_NAME_KEY
from fedmodel.runtime.processes import (
    executable,
    plain_lines,
    recorded_process,
    start_detached,
    tool_environment,
)

ACCOUNTING_CACHE_DIR = "accounting-cache"  # in the node directory
SECRET_FILE = "superexec.secret"  # the Runtime API secret shared with the executor
_UNTRUSTED_SERVER = (
    "the server's certificate is not signed by the bundle's CA, or has expired (the "
    "operator sees which with 'fedmodel server status' and renews with 'server renew-cert')"
)
# Flower's SuperNode exit lines, in words a data owner can act on
_REFUSALS = {  # Flower's node-side error lines read "[code: 2004] Failed to activate ..."
    "[code: 2004]": "the federation refused this node: its key is not enrolled, or was revoked",
    "[code: 2001]": "the federation requires an enrolled node key",
    "CERTIFICATE_VERIFY_FAILED": _UNTRUSTED_SERVER,
    "BAD_SIGNATURE": _UNTRUSTED_SERVER,
    "Socket closed": "the server closed the connection (it requires TLS?)",
}


# What Flower's SuperNode logs once it has decided to exit (a signal, or a refusal)
SUPERNODE_EXITING = ("terminated gracefully", "Exit Code:")


class SuperNodeError(FedModelError):
    """The SuperNode could not join or stopped with an error."""

    exit_code = ExitCode.SUPERNODE


@dataclass(frozen=True)
class NodeLaunch:
    """Everything `flower-supernode` needs for one node."""

    directory: Path
    identity: NodeIdentity
    bundle: JoinBundle
    data_path: Path
    label: str
    device: str
    port: int  # local runtime API, on 127.0.0.1
    insecure: bool = False  # only to demonstrate that a TLS federation refuses it
    max_wait_time: float | None = None

    def __post_init__(self) -> None:
        node_config_toml(node_config(self))  # a path TOML cannot carry fails before any start

    @property
    def log_path(self) -> Path:
        return self.directory / "supernode.log"

    @property
    def executor_log_path(self) -> Path:
        return self.directory / "executor.log"


def node_config(launch: NodeLaunch) -> dict[str, str | float]:
    """What the ClientApp reads from `context.node_config` on this node."""
    config: dict[str, str | float] = {
        DATA_PATH_KEY: str(launch.data_path.absolute()),
        LABEL_KEY: launch.label,
        NODE_NAME_KEY: launch.bundle.node_name,
        LEDGER_PATH_KEY: str(ledger_path(launch.directory).absolute()),
        "device": launch.device,
    }  # the owner's budget and limits live in the policy file, read by the executor
    return config


def node_config_toml(config: dict[str, str | float]) -> str:
    """`config` as the TOML file Flower's `--node-config` reads (UTF-8).

    Strings are TOML basic strings with only quotes, backslashes and control characters
    escaped: JSON's escapes are not TOML's (it writes a character outside the BMP, an
    emoji in a folder name say, as a surrogate pair, which TOML rejects).
    """
    lines = []
    for key, value in config.items():
        if isinstance(value, str):
            if any("\ud800" <= character <= "\udfff" for character in value):
                raise SuperNodeError(
                    f"node config {key} {value!r} is not valid UTF-8 (a file name in another "
                    "encoding?); rename it so the SuperNode can be told where it is"
                )
            lines.append(f'{key} = "{"".join(map(_toml_escape, value))}"\n')
        else:  # a finite number is written alike in JSON and TOML
            lines.append(f"{key} = {json.dumps(value)}\n")
    return "".join(lines)


def _toml_escape(character: str) -> str:
    if character in '"\\':
        return "\\" + character
    if character < " " or character == "\x7f":
        return f"\\u{ord(character):04x}"
    return character


def supernode_command(launch: NodeLaunch) -> list[str]:
    ca_path = launch.directory / "federation-ca.crt"
    config_path = launch.directory / "node-config.toml"
    write_public_file(ca_path, launch.bundle.ca_certificate.encode())
    write_public_file(config_path, node_config_toml(node_config(launch)).encode())
    command = [executable("flower-supernode"), "--isolation", "process"]
    command += ["--insecure"] if launch.insecure else ["--root-certificates", str(ca_path)]
    if not launch.insecure:  # Flower refuses a node key on a plaintext channel
        command += ["--auth-supernode-private-key", str(launch.identity.private_key)]
    command += [
        "--superlink", launch.bundle.fleet_address,
        "--node-config", str(config_path),
        "--host", "127.0.0.1",
        "--port", str(launch.port),
        # only FedModel's executor (client/executor.py) may acquire this node's tasks
        "--superexec-auth-secret-file", str(launch.directory / SECRET_FILE),
    ]  # fmt: skip
    if launch.max_wait_time is not None:
        command += ["--max-wait-time", str(launch.max_wait_time)]
    return command


def supernode_environment(device: str, directory: Path) -> dict[str, str]:
    """The device choice is enforced by what CUDA devices the ClientApp can see; the
    node's accounting cache lives in its own 0700 directory, where no other local user
    can edit a cached noise multiplier or RDP curve (fedmodel.privacy.accounting_cache)."""
    environment = tool_environment()
    environment[CACHE_DIR_VARIABLE] = str(directory / ACCOUNTING_CACHE_DIR)
    if device == "cpu":
        environment["CUDA_VISIBLE_DEVICES"] = ""
    elif device.startswith("cuda:"):
        environment["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    return environment


def running_process(directory: Path, name: str) -> int | None:
    """PID of this node directory's running `name` (flower-supernode or client.executor).

    Read from NODE/<role>.pid and checked against the process's command line, so a stale
    PID file naming some other process never counts.
    """
    role = "supernode" if name == "flower-supernode" else "executor"
    found = recorded_process(directory / f"{role}.pid", name, directory)
    return None if found is None else found[0]


def start_node(launch: NodeLaunch) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """Start the SuperNode and FedModel's executor, each in its own session.

    They log to NODE/supernode.log and NODE/executor.log. One SuperNode per node
    directory: a second one would share its key (Flower refuses a key that is already
    online) and its files. A fresh Runtime API secret (0600) is made for each start.
    """
    running = running_process(launch.directory, "flower-supernode")
    if running is not None:
        raise SuperNodeError(
            f"a SuperNode for {launch.directory} is already running (pid {running}); "
            "one node directory, one SuperNode"
        )
    secret = secrets.token_hex(32).encode()
    write_private_file(launch.directory / SECRET_FILE, secret, force=True)
    supernode = _start_logged(supernode_command(launch), launch, launch.log_path)
    write_public_file(launch.directory / "supernode.pid", f"{supernode.pid}\n".encode())
    executor = [
        sys.executable, "-m", "client.executor", "--dir", str(launch.directory),
        "--runtime-api-address", f"127.0.0.1:{launch.port}",
        "--supernode-pid", str(supernode.pid),
    ]  # fmt: skip
    process = _start_logged(executor, launch, launch.executor_log_path)
    write_public_file(launch.directory / "executor.pid", f"{process.pid}\n".encode())
    return supernode, process


def _start_logged(command: list[str], launch: NodeLaunch, log: Path) -> subprocess.Popen[bytes]:
    return start_detached(
        command,
        log,
        supernode_environment(launch.device, launch.directory),
        cwd=launch.directory,
        die_with_parent=True,
    )


def explain_exit(log_text: str) -> str:
    """One line saying why the SuperNode stopped, from its log."""
    for marker, meaning in _REFUSALS.items():
        if marker in log_text:
            return meaning
    lines = plain_lines(log_text)
    lines = [line for line in lines if line]
    for number, line in enumerate(lines[:-1]):
        if "Exit Code:" in line:  # Flower prints the reason on the next line
            return f"{line.split('Exit Code:')[1].strip()}: {lines[number + 1]}"
    if any("terminated gracefully" in line for line in lines):
        return "the federation disconnected this node (revoked, or the server stopped)"
    return lines[-1] if lines else "no output"


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before connecting."""
    if device in ("auto", "cpu"):
        return
    if not device.startswith("cuda:") or not device[5:].isdigit():
        raise SuperNodeError(f"--device must be auto, cpu or cuda:N (got '{device}')")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(device[5:]) >= count:
        raise SuperNodeError(
            f"--device {device}: this machine has {count} CUDA device(s); use auto or cpu"
        )
