"""The federation server: its directory, and the Flower SuperLink run from it.

A federation directory holds everything the operator's side needs:

    federation.toml   addresses and ports (what `server init` was told)
    ca.crt ca.key     the federation's CA (ca.key 0600; keep it offline if you can)
    server.pem/.key   the SuperLink's TLS certificate and key
    state.db          Flower's state: runs, and the registry of enrolled node keys
    flwr-home/        a private FLWR_HOME whose config.toml names this SuperLink
    nodes.json        our names for enrolled nodes (and their max_rows caps)
    audit.jsonl       the audit log; audit.key (0600) its HMAC key, audit.jsonl.head its head
    federation.lock   held while nodes.json or the audit log change
    superlink.log     everything the SuperLink prints

The Fleet API (what nodes connect to) binds the configured address only; the
Control and Runtime APIs bind 127.0.0.1, because open-source Flower does not
authenticate them: whoever reaches them can start runs and enroll or revoke nodes.
That is also why the server host must be single-user: 127.0.0.1 is reachable by
every local account, and ca.crt is all a client needs. The directory is 0700 and
state.db 0600 whatever the umask, which keeps other users out of the files, not
out of the Control API.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedmodel.errors import ExitCode, FedModelError
from fedmodel.pki import (
    CertificateError,
    create_server_pki,
    load_certificate_bytes,
    private_directory,
    renew_server_certificate,
    write_public_file,
)
from fedmodel.runtime.processes import (
    executable,
    recorded_process,
    start_detached,
    stop_group,
    tool_environment,
)
from fedmodel.runtime.processes import follow_log as follow_process_log
from fedmodel.runtime.superlink import answers_health, wait_until_healthy

CONNECTION = "fedmodel"  # the SuperLink connection name inside DIR/flwr-home
DEFAULT_FLEET_PORT = 9092
DEFAULT_CONTROL_PORT = 9093
EXPIRY_WARNING = datetime.timedelta(days=30)


# gRPC logs failed TLS handshakes (plaintext or wrong-CA nodes) only at INFO; the audit
# log is built from them. It also prints one line saying INFO is verbose: expected.
SUPERLINK_ONLY_ENVIRONMENT = {"GRPC_VERBOSITY": "INFO"}


class ServerError(FedModelError):
    """The federation directory or its SuperLink is not in the state a command needs."""

    exit_code = ExitCode.SERVER


@dataclass(frozen=True)
class Federation:
    """A federation directory as `server init` wrote it."""

    directory: Path
    addresses: tuple[str, ...]
    bind_address: str
    fleet_port: int
    control_port: int

    @property
    def fleet_address(self) -> str:
        """What nodes dial: the first configured address."""
        return _host_port(self.addresses[0], self.fleet_port)

    @property
    def fleet_bind(self) -> str:
        return _host_port(self.bind_address, self.fleet_port)

    @property
    def control_address(self) -> str:
        return f"127.0.0.1:{self.control_port}"

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def flwr_home(self) -> Path:
        return self.directory / "flwr-home"

    @classmethod
    def load(cls, directory: Path) -> Federation:
        config_path = directory / "federation.toml"
        if not config_path.is_file():
            raise ServerError(
                f"{directory} is not a federation directory (no federation.toml); "
                f"run 'fedmodel server init --dir {directory} --address HOST' first"
            )
        raw = tomllib.loads(config_path.read_text())["federation"]
        return cls(
            directory=directory.absolute(),
            addresses=tuple(raw["addresses"]),
            bind_address=str(raw["bind-address"]),
            fleet_port=int(raw["fleet-port"]),
            control_port=int(raw["control-port"]),
        )


def init_federation(
    directory: Path,
    addresses: list[str],
    fleet_port: int = DEFAULT_FLEET_PORT,
    control_port: int = DEFAULT_CONTROL_PORT,
    bind_address: str | None = None,
    force: bool = False,
) -> tuple[Federation, str]:
    """Create the CA, server certificate, federation.toml and CLI connection; (fed, CA fp)."""
    addresses = [a.strip() for a in addresses if a.strip()]
    if not addresses:
        raise ServerError("--address needs at least one host name or IP address")
    for port, option in ((fleet_port, "--fleet-port"), (control_port, "--control-port")):
        if not 0 < port < 65536:
            raise ServerError(f"{option} must be between 1 and 65535 (got {port})")
    if fleet_port == control_port:
        raise ServerError("--fleet-port and --control-port must differ")
    directory = directory.absolute()
    pki = create_server_pki(directory, addresses, force=force)
    federation = Federation(
        directory, tuple(addresses), bind_address or addresses[0], fleet_port, control_port
    )
    toml = "\n".join(
        [
            "# Written by `fedmodel server init`. Nodes dial addresses[0]:fleet-port.",
            "[federation]",
            f"addresses = [{', '.join(_quote(a) for a in addresses)}]",
            f"bind-address = {_quote(federation.bind_address)}  # Fleet API listens here only",
            f"fleet-port = {fleet_port}",
            f"control-port = {control_port}  # Control/Runtime API, always on 127.0.0.1",
            f"ca-fingerprint = {_quote(pki.ca_fingerprint)}",
            "",
        ]
    )
    write_public_file(directory / "federation.toml", toml.encode())
    write_connection(federation)
    return federation, pki.ca_fingerprint


def write_connection(federation: Federation) -> None:
    """A Flower CLI connection to this SuperLink's Control API, trusting only our CA."""
    private_directory(federation.flwr_home)
    text = "\n".join(
        [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f"address = {_quote(federation.control_address)}",
            f"root-certificates = {_quote(str(federation.path('ca.crt')))}",
            "",
        ]
    )
    write_public_file(federation.flwr_home / "config.toml", text.encode())


def superlink_command(federation: Federation, insecure: bool = False) -> list[str]:
    """flower-superlink with TLS, node authentication and every listener pinned."""
    command = [_executable("flower-superlink")]
    if insecure:
        command += ["--insecure"]
    else:
        command += [
            "--ssl-ca-certfile", str(federation.path("ca.crt")),
            "--ssl-certfile", str(federation.path("server.pem")),
            "--ssl-keyfile", str(federation.path("server.key")),
            "--enable-supernode-auth",
        ]  # fmt: skip
    command += [
        "--database", str(federation.path("state.db")),
        "--disable-runtime-dependency-installation",
        "--fleet-api-type", "grpc-rere",
        "--fleet-api-address", federation.fleet_bind,
        "--host", "127.0.0.1",
        "--port", str(federation.control_port),
    ]  # fmt: skip
    return command


def server_environment(federation: Federation) -> dict[str, str]:
    """Flower tools' environment with this federation's private FLWR_HOME."""
    return tool_environment(federation.flwr_home)


def start_superlink(federation: Federation, insecure: bool = False) -> subprocess.Popen[bytes]:
    """Start the SuperLink in its own session, logging to DIR/superlink.log; wait for health."""
    running = superlink_pid(federation)
    if running is not None:
        raise ServerError(
            f"a SuperLink for {federation.directory} is already running (pid {running}); "
            f"stop it with 'fedmodel server stop --dir {federation.directory}'"
        )
    if insecure and not is_loopback(federation.bind_address):
        raise ServerError(
            f"--insecure binds 127.0.0.1 only, but this federation binds "
            f"{federation.bind_address}; test without TLS in a federation made with "
            "'--bind 127.0.0.1'"
        )
    for name in ("ca.crt", "server.pem", "server.key"):
        if not insecure and not federation.path(name).is_file():
            raise ServerError(f"{federation.path(name)} is missing; rerun 'fedmodel server init'")
    private_directory(federation.directory)
    for name in ("state.db", "superlink.log"):  # Flower would create state.db with the umask
        os.close(os.open(federation.path(name), os.O_WRONLY | os.O_CREAT, 0o600))
        federation.path(name).chmod(0o600)
    log_path = federation.path("superlink.log")
    process = start_detached(
        superlink_command(federation, insecure),
        log_path,
        {**server_environment(federation), **SUPERLINK_ONLY_ENVIRONMENT},
        cwd=federation.directory,  # ServerApp outputs with relative paths land here
    )
    write_public_file(federation.path("superlink.pid"), f"{process.pid}\n".encode())
    try:
        wait_until_healthy(
            process,
            _health_url(federation, insecure),
            log_path,
            ServerError,
            _context(federation, insecure),
        )
    except BaseException:
        stop_superlink(federation, process.pid)
        raise
    return process


def is_healthy(federation: Federation, insecure: bool = False) -> bool:
    """Whether the Control API answers /health (over TLS verified against our CA)."""
    return answers_health(_health_url(federation, insecure), _context(federation, insecure))


def _health_url(federation: Federation, insecure: bool) -> str:
    return f"{'http' if insecure else 'https'}://{federation.control_address}/health"


def _context(federation: Federation, insecure: bool) -> ssl.SSLContext | None:
    return None if insecure else ssl.create_default_context(cafile=federation.path("ca.crt"))


def superlink_pid(federation: Federation) -> int | None:
    """The PID in DIR/superlink.pid if that process is alive and is a flower-superlink."""
    found = _superlink_process(federation)
    return None if found is None else found[0]


def runs_insecure(federation: Federation) -> bool:
    """Whether the running SuperLink was started with --insecure (no TLS, no node auth)."""
    found = _superlink_process(federation)
    return found is not None and "--insecure" in found[1]


def _superlink_process(federation: Federation) -> tuple[int, list[str]] | None:
    pid_file = federation.path("superlink.pid")
    return recorded_process(pid_file, "flower-superlink", federation.directory)


def certificate_problems(
    federation: Federation, now: datetime.datetime | None = None
) -> list[tuple[str, str]]:
    """("error" | "warning", line) for each certificate expired or expiring within 30 days."""
    now = now or datetime.datetime.now(datetime.UTC)
    problems = []
    for name, remedy in (
        ("server.pem", f"renew it: fedmodel server renew-cert --dir {federation.directory}"),
        ("ca.crt", "a new CA needs 'server init --force' and new join bundles for every node"),
    ):
        try:
            certificate = load_certificate_bytes(federation.path(name).read_bytes())
        except (OSError, CertificateError):
            problems.append(("error", f"{federation.path(name)} is missing or unreadable"))
            continue
        left = certificate.not_valid_after_utc - now
        if left <= datetime.timedelta(0):
            problems.append(
                ("error", f"{name} EXPIRED on {certificate.not_valid_after_utc:%Y-%m-%d}: "
                 f"nodes cannot connect; {remedy}")
            )  # fmt: skip
        elif left < EXPIRY_WARNING:
            problems.append(
                ("warning", f"{name} expires on {certificate.not_valid_after_utc:%Y-%m-%d} "
                 f"({left.days} days left); {remedy}")
            )  # fmt: skip
    return problems


def renew_certificate(federation: Federation) -> datetime.datetime:
    """Reissue server.pem/.key from the federation's CA for its addresses; the new expiry."""
    try:
        certificate = renew_server_certificate(federation.directory, list(federation.addresses))
    except CertificateError as error:
        raise ServerError(str(error)) from None
    return certificate.not_valid_after_utc


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def stop_superlink(federation: Federation, pid: int | None = None, timeout: float = 15) -> bool:
    """SIGTERM the SuperLink's process group (it, SuperExec, ServerApps), then SIGKILL."""
    pid = pid if pid is not None else superlink_pid(federation)
    if pid is None:
        return False
    stop_group(pid, timeout)
    federation.path("superlink.pid").unlink(missing_ok=True)
    return True


def follow_log(
    federation: Federation,
    process: subprocess.Popen[bytes],
    on_line: Callable[[str], None],
    offset: int | None = None,
) -> int:
    """Hand every new SuperLink log line to `on_line` until the process exits."""
    return follow_process_log(federation.path("superlink.log"), process, on_line, offset)


def _executable(name: str) -> str:
    try:
        return executable(name)
    except FedModelError as error:
        raise ServerError(str(error)) from None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
