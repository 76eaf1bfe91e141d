"""The operator's side, locked down: concurrent enrollment, private files, certificates.

A real TLS SuperLink on 127.0.0.1, driven through the `fedmodel` CLI with umask 000, so
that no file mode is right by the umask's grace.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fedmodel.pki import JoinBundle, create_node_identity, create_server_pki
from fedmodel.runtime.processes import free_port
from server.enrollment import NOT_ENROLLED, flwr_cli, list_nodes, load_registry, verify_audit
from server.superlink import Federation, certificate_problems
from tests.federation import FEDMODEL, federation_workspace


def _umask_000() -> None:
    os.umask(0)


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI as an operator with umask 000 would run it."""
    return subprocess.run(
        [*FEDMODEL, *map(str, args)],
        capture_output=True, text=True, timeout=120, preexec_fn=_umask_000,
        env={**os.environ, "COLUMNS": "200"},  # tables unwrapped, as on a wide terminal
    )  # fmt: skip


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _init(server: Path, *extra: str) -> None:
    ports = ("--fleet-port", str(free_port()), "--control-port", str(free_port()))
    done = _cli("server", "init", "--dir", server, "--address", "127.0.0.1", *ports, *extra)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running TLS federation in ROOT/srv, stopped (with anything it started) afterwards."""
    root = tmp_path_factory.mktemp("operator")
    with federation_workspace(root):
        _init(root / "srv")
        started = _cli("server", "start", "--dir", root / "srv", "--detach")
        assert started.returncode == 0, started.stderr
        yield root / "srv"


@pytest.mark.slow
def test_files_are_private_whatever_the_umask(server: Path, tmp_path: Path) -> None:
    assert _mode(server) == _mode(server / "flwr-home") == 0o700
    for private in ("ca.key", "server.key", "state.db", "superlink.log"):
        assert _mode(server / private) == 0o600, private
    for public in ("ca.crt", "server.pem", "federation.toml", "flwr-home/config.toml"):
        assert _mode(server / public) == 0o644, public
    node = tmp_path / "node"
    assert _cli("client", "init", "--dir", node).returncode == 0
    assert _mode(node) == 0o700
    assert _mode(node / "node.key") == 0o600 and _mode(node / "node.pub") == 0o644


@pytest.mark.slow
def test_eight_concurrent_enrollments_all_land_in_registry_and_audit_log(
    server: Path, tmp_path: Path
) -> None:
    names = [f"site-{number}" for number in range(8)]
    keys = {name: create_node_identity(tmp_path / name).public_key for name in names}
    commands = [
        [*FEDMODEL, "server", "enroll", str(keys[name]), "--name", name, "--dir", str(server),
         "--max-rows", str(100 * (number + 1))]
        for number, name in enumerate(names)
    ]  # fmt: skip
    enrollments = [
        subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_umask_000,
        )
        for command in commands
    ]
    for enrollment in enrollments:
        _, errors = enrollment.communicate(timeout=180)
        assert enrollment.returncode == 0, errors
    federation = Federation.load(server)
    registry = load_registry(federation)
    assert {name: registry[name]["max_rows"] for name in names} == {
        name: 100 * (number + 1) for number, name in enumerate(names)
    }
    registered = {node["node_id"] for node in list_nodes(federation)}  # Flower's view, joined
    assert {registry[name]["node_id"] for name in names} <= registered
    events, _ = verify_audit(federation)
    assert sorted(e["node"] for e in events if e["event"] == "enrolled" and e["node"] in names) \
        == names  # fmt: skip
    for private in ("audit.jsonl", "audit.jsonl.head", "audit.key"):
        assert _mode(server / private) == 0o600, private
    assert _mode(server / "nodes.json") == 0o644  # no secret; the directory is 0700
    listing = _cli("server", "nodes", "--dir", server).stdout
    assert "max rows" in listing and "800" in listing

    # a key registered with Flower behind FedModel's back is shown, and named as such
    stranger = create_node_identity(tmp_path / "stranger").public_key
    flwr_cli(federation, "supernode", "register", str(stranger), "--name", "stranger")
    (outsider,) = [node for node in list_nodes(federation) if node["name"] == NOT_ENROLLED]
    assert outsider["node_id"] not in {registry[name]["node_id"] for name in names}
    assert NOT_ENROLLED in _cli("server", "nodes", "--dir", server).stdout


@pytest.mark.slow
def test_renewed_certificate_is_served_after_a_restart_and_bundles_still_hold(
    server: Path, tmp_path: Path
) -> None:
    node = create_node_identity(tmp_path / "node")
    enrolled = _cli("server", "enroll", node.public_key, "--name", "renewal", "--dir", server)
    assert enrolled.returncode == 0, enrolled.stderr
    bundle = JoinBundle.load(server / "bundles" / "renewal.join")
    before = (server / "server.pem").read_bytes()

    renewed = _cli("server", "renew-cert", "--dir", server)
    assert renewed.returncode == 0, renewed.stderr
    assert "restart it" in renewed.stdout  # the running SuperLink serves the old one
    certificate = x509.load_pem_x509_certificate((server / "server.pem").read_bytes())
    assert (server / "server.pem").read_bytes() != before
    certificate.verify_directly_issued_by(
        x509.load_pem_x509_certificate(bundle.ca_certificate.encode())
    )
    assert JoinBundle.load(server / "bundles" / "renewal.join") == bundle
    assert bundle.ca_fingerprint in (server / "federation.toml").read_text()
    left = certificate.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert left.days in (396, 397)

    assert _cli("server", "stop", "--dir", server).returncode == 0
    restarted = _cli("server", "start", "--dir", server, "--detach")
    assert restarted.returncode == 0, restarted.stderr
    context = ssl.create_default_context(cadata=bundle.ca_certificate)  # what a node trusts
    port = Federation.load(server).control_port
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        served = tls.getpeercert(binary_form=True)
    assert served == certificate.public_bytes(Encoding.DER)
    events, _ = verify_audit(Federation.load(server))
    assert events[-1]["event"] == "certificate-renewed"


@pytest.mark.slow
def test_insecure_mode_binds_loopback_only_and_status_says_so(tmp_path: Path) -> None:
    with federation_workspace(tmp_path):
        exposed = tmp_path / "exposed"
        _init(exposed, "--bind", "0.0.0.0")
        refused = _cli("server", "start", "--dir", exposed, "--insecure", "--detach")
        assert refused.returncode != 0 and not (exposed / "superlink.pid").exists()
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith("error: --insecure binds 127.0.0.1 only"), line

        server = tmp_path / "srv"
        _init(server)
        assert _cli("server", "start", "--dir", server, "--insecure", "--detach").returncode == 0
        status = _cli("server", "status", "--dir", server)
        assert status.returncode == 0 and "Control API answering" in status.stdout
        assert "warning: the SuperLink runs with --insecure" in status.stderr


def test_status_warns_a_month_before_expiry_and_errors_after(tmp_path: Path) -> None:
    create_server_pki(tmp_path, ["127.0.0.1"])
    federation = Federation(tmp_path, ("127.0.0.1",), "127.0.0.1", 1, 2)
    expiry = x509.load_pem_x509_certificate(
        (tmp_path / "server.pem").read_bytes()
    ).not_valid_after_utc
    assert certificate_problems(federation, expiry - datetime.timedelta(days=31)) == []
    ((level, line),) = certificate_problems(federation, expiry - datetime.timedelta(days=29))
    assert level == "warning" and "server.pem expires" in line and "renew-cert" in line
    ((level, line),) = certificate_problems(federation, expiry + datetime.timedelta(seconds=1))
    assert level == "error" and "server.pem EXPIRED" in line
    assert certificate_problems(federation) == []  # today: fresh certificates
