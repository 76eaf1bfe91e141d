"""Deployment, end to end on 127.0.0.1: real TLS SuperLink, real enrolled SuperNodes.

Every process is started through the `fedmodel` CLI (tests/federation.py), in a fresh
temporary directory, and stopped afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmodel.feature_statistics import FeatureStatistics
from fedmodel.local_tables import table_statistics
from fedmodel.pki import JoinBundle, create_node_identity, create_server_pki
from fedmodel.privacy.accountant import epsilon_of
from fedmodel.privacy.ledger import PrivacyLedger
from fedmodel.runtime.processes import free_port
from tests.conftest import assert_epsilons_recompute
from tests.federation import (
    ROWS_PER_SITE,
    Workspace,
    background,
    federation_workspace,
    fedmodel,
    operator_ca_fingerprint,
    wait_for_text,
    wait_until_activated,
    wait_until_online,
    write_sites,
)

pytestmark = pytest.mark.slow  # every test here runs the CLI in subprocesses


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    with federation_workspace(tmp_path) as space:
        yield space


def _listening(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on `port`, from /proc/net/tcp and tcp6."""
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            host, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                addresses.append(host)
    return addresses


LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::ffff:127.0.0.1


def _wait_for_ledger_round(
    sites: list[Path], server_round: int, process: subprocess.Popen[str], timeout: float
) -> None:
    """Until every site's ledger holds a write-ahead entry for `server_round`."""

    def reached() -> bool:
        ledgers = [PrivacyLedger(site / "privacy-ledger.sqlite") for site in sites]
        return all(server_round in {e.server_round for e in led.entries()} for led in ledgers)

    _wait_for(reached, process, timeout, f"not every ledger of {sites} reached {server_round}")


def _wait_for(done: Callable[[], bool], process: subprocess.Popen[str], timeout: float,
              failure: str) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while not done():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(failure)
        time.sleep(0.1)


def _wait_for_exit(process: subprocess.Popen[str], timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process {process.args} did not exit within {timeout} s")


def test_tls_federation_trains_on_enrolled_nodes_and_refuses_everyone_else(
    workspace: Workspace,
) -> None:
    started, root = workspace.started, workspace.path
    server = root / "srv"
    fleet_port, control_port = free_port(), free_port()
    result = fedmodel(
        "server", "init", "--dir", server, "--address", "127.0.0.1",
        "--fleet-port", fleet_port, "--control-port", control_port,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((server / key).stat().st_mode) == 0o600

    result = fedmodel("server", "start", "--dir", server, "--detach", timeout=90)
    assert result.returncode == 0, result.stderr
    for port in (fleet_port, control_port):  # nothing listens on 0.0.0.0
        assert set(_listening(port)) and set(_listening(port)) <= LOOPBACK_HEX

    sites = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    data = write_sites(root, sites)
    for site in sites:
        assert fedmodel("client", "init", "--dir", root / site).returncode == 0
        assert stat.S_IMODE((root / site / "node.key").stat().st_mode) == 0o600
        enrolled = fedmodel("server", "enroll", root / site / "node.pub", "--name", site,
                            "--dir", server)  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
    nodes = {}
    for site in sites:
        nodes[site] = background(
            "client", "start", "--dir", root / site,
            "--join", server / "bundles" / f"{site}.join", "--data", data[site],
            "--label", "death", "--device", "cpu", "--budget-epsilon", "3.0",
            "--ca-fingerprint", operator_ca_fingerprint(server), log=root / f"{site}.out",
        )  # fmt: skip
        started.append(nodes[site])

    # Would-be intruders, while the run goes on: none may join or disturb it. Each has
    # its own valid P-384 key that was never enrolled, and a bundle forged for it.
    bundle = JoinBundle.load(server / "bundles" / "hospital-a.join")
    other_pki = create_server_pki(root / "other-ca", ["127.0.0.1"])
    other_ca = other_pki.ca_certificate.read_text()
    strangers = {}
    refused = {}
    for name, extra in (("unenrolled", ()), ("wrong-ca", ()), ("plaintext", ("--insecure",))):
        strangers[name] = create_node_identity(root / name)
        forged = dataclasses.replace(bundle, node_fingerprint=strangers[name].fingerprint)
        pin = operator_ca_fingerprint(server)
        if name == "wrong-ca":  # its owner pinned that CA: the SuperLink's TLS refuses it
            forged = dataclasses.replace(forged, ca_certificate=other_ca)
            pin = other_pki.ca_fingerprint
        (root / f"{name}.join").write_text(forged.to_json())
        refused[name] = background(
            "client", "start", "--dir", root / name, "--join", root / f"{name}.join",
            "--data", data["hospital-a"], "--label", "death", "--max-wait-time", "10",
            "--budget-epsilon", "1", "--ca-fingerprint", pin, *extra,
            log=root / f"{name}.out",
        )  # fmt: skip
        started.append(refused[name])

    # Train with all four. A deployed round is one train message per node (it also
    # evaluates the model it received), answered in well under a second, so each crash
    # below is staged by pausing node executors (SIGSTOP) at a known state, never by
    # timing. Once c and d have answered round 1 and the server has checkpointed it, c
    # is revoked and d's SuperNode SIGKILLed, their executors paused: round 2 completes
    # with a and b (--min-clients 2). Once a and b have answered round 2, their
    # executors are paused; when round 3 has reached both of them, the coordinator
    # (SuperLink and ServerApp) is SIGKILLed, and the resumed executors train round 3
    # for a coordinator that is gone. Restarted, `run --resume` asks for round 3 again
    # from round 2's checkpoint: a and b refuse it as a replay (their ledgers hold it), so
    # each owner spends round 3 once and the run ends on round 2's model.
    for site in sites:  # logged once activated: then one listing suffices
        wait_until_activated(root / site, nodes[site])
    wait_until_online(server, 4)
    started_at = time.monotonic()
    run = background(
        "run", "--dir", server, "--rounds", "3", "--epsilon", "2.0", "--min-clients", "2",
        "--batch-size", "32", "--round-timeout", "180", "--output", root / "run",
        log=root / "run.out",
    )  # fmt: skip
    started.append(run)

    def executor_group(site: str) -> int:
        return int((root / site / "executor.pid").read_text())

    for site in ("hospital-c", "hospital-d"):
        # after its reply, a SuperNode sleeps 3 s before it pulls round 2
        wait_for_text(root / site / "executor.log", "train: answered", run, 400)
        os.killpg(executor_group(site), signal.SIGSTOP)
    # d's SuperNode dies once its reply (after the query's) has left: the SuperLink gives up
    # on d 36-60 s after d's last heartbeat, so round 2 waits less the sooner d dies
    wait_for_text(root / "hospital-d" / "supernode.log", "Sent successfully", run, 400, 2)
    os.killpg(int((root / "hospital-d" / "supernode.pid").read_text()), signal.SIGKILL)
    checkpoint = root / "run" / "checkpoints" / "round-0001.pt"
    _wait_for(checkpoint.exists, run, 400, "round 1 was never checkpointed")
    revoke = fedmodel("server", "revoke", "hospital-c", "--dir", server)
    assert revoke.returncode == 0, revoke.stderr
    # The revoked node is cut off (round 2 waits for d's missed heartbeats meanwhile).
    assert _wait_for_exit(nodes["hospital-c"], 180) != 0
    assert "disconnected this node" in (root / "hospital-c.out").read_text()
    # Nor can it come back with its key (its CA pin is stored: no flag): tried while round 2
    # waits for d, before the coordinator crashes; its error is checked with the intruders'.
    refused["revoked"] = background(
        "client", "start", "--dir", root / "hospital-c",
        "--join", server / "bundles" / "hospital-c.join", "--data", data["hospital-c"],
        "--label", "death", "--max-wait-time", "10", log=root / "revoked.out",
    )  # fmt: skip
    started.append(refused["revoked"])
    survivors = ("hospital-a", "hospital-b")
    for site in survivors:
        wait_for_text(root / site / "executor.log", "train: answered", run, 400, count=2)
        os.killpg(executor_group(site), signal.SIGSTOP)
    for site in survivors:  # round 3 has reached each node (after the query, 2 rounds)
        wait_for_text(root / site / "supernode.log", "Received successfully", run, 400, 4)
    assert _wait_for_exit(refused["revoked"], 120) != 0  # refused by this SuperLink, not dead
    os.killpg(int((server / "superlink.pid").read_text()), signal.SIGKILL)
    assert _wait_for_exit(run, 120) != 0  # its coordinator is gone
    for site in survivors:
        os.killpg(executor_group(site), signal.SIGCONT)
    _wait_for_ledger_round([root / s for s in survivors], 3, nodes["hospital-a"], 400)
    assert "round 1/3" in (root / "run.out").read_text()
    assert "round 3/3" not in (root / "run.out").read_text()
    assert not (root / "run" / "checkpoints" / "round-0003.pt").exists()

    result = fedmodel("server", "start", "--dir", server, "--detach", timeout=90)
    assert result.returncode == 0, result.stderr
    wait_until_online(server, 2)  # a and b reconnect by themselves
    resumed = background(
        "run", "--dir", server, "--resume", root / "run", log=root / "resumed.out"
    )  # fmt: skip
    started.append(resumed)
    assert _wait_for_exit(resumed, 400) == 0, (root / "resumed.out").read_text()
    elapsed = time.monotonic() - started_at
    output = (root / "resumed.out").read_text()
    # a and b trained round 3 for the crashed coordinator: asked again, they refuse it
    assert output.count("replayed-round: round 3 of run") == 2, output
    assert "round 1/3" not in output
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["completed"] and summary["scenario"] == "deployment"
    assert summary["stopped_early"].startswith("only 0 clients trained in round 3")
    rows = {row["round"]: row for row in summary["per_round"]}
    assert rows[1]["clients"] == 4  # round 2: c's and d's executors were paused before it
    assert rows[2]["clients"] == 2 and rows[2]["errors"] + rows[2]["timeouts"] >= 1
    assert 0.0 < rows[2]["auroc"] < 1.0  # the model the run ends with, scored by a and b
    assert sorted(client["node"] for client in summary["clients"]) == sites
    for client in summary["clients"]:
        # 80% of each site's rows train (96); the owners release counts rounded to 10
        assert ROWS_PER_SITE - ROWS_PER_SITE // 5 == 96 and client["num_examples"] == 100
        assert 0 < client["epsilon"] <= 2.0 + 1e-6
        rounds_trained = len(client["epsilon_by_round"])
        if client["node"] in ("hospital-c", "hospital-d"):
            assert rounds_trained == 1
            continue
        assert rounds_trained == 2  # round 3's reply went to the crashed coordinator
        # a survivor's own ledger holds one run and one mechanism, round 3 once
        ledger = PrivacyLedger(root / client["node"] / "privacy-ledger.sqlite")
        (fingerprint,) = {entry.fingerprint for entry in ledger.entries()}
        pending = [e.server_round for e in ledger.entries() if e.status == "pending"]
        assert sorted(pending) == [1, 2, 3]
        ((noise, rate, steps),) = ledger.spent_history(fingerprint)
        assert steps == 3 * round(1 / rate)
        spent = epsilon_of([(noise, rate, steps)], 1e-5)
        assert client["epsilon"] < spent <= 2.0 + 1e-6  # the planned 2.0, each round once
    assert not (root / "run" / "checkpoints" / "round-0003.pt").is_file()
    assert_epsilons_recompute(summary, rows=dict.fromkeys(sites, 96))  # 80% of each file
    # The coordinator's model file: the model the run ended on, each owner's epsilon and,
    # of the data, only the statistics the first query round merged and sent every node
    # (the resumed run, with two nodes left, kept that encoding).
    model = json.loads((root / "run" / "model" / "model.json").read_text())
    assert sorted(path.name for path in (root / "run" / "model").iterdir()) == [
        "model.json", "model.safetensors",
    ]  # fmt: skip
    assert model["round"] == 2 and sorted(model["privacy"]["epsilon_per_owner"]) == sites
    stored = model["table"]["statistics"]
    released = json.loads(merged_statistics([data[site] for site in sites]).to_json())
    assert stored["rows"] == released["rows"] and stored["categories"] == released["categories"]
    assert sorted(stored["numeric"]) == sorted(released["numeric"])
    for column, sums in released["numeric"].items():  # merged in any order: last bits differ
        assert stored["numeric"][column] == pytest.approx(sums, rel=1e-12)
    scored = fedmodel("predict", root / "run", "--data", data["hospital-a"], "--label", "death")
    assert scored.returncode == 0 and len(scored.stdout.splitlines()) == 1 + ROWS_PER_SITE
    print(f"3-round deployment run (revocation, node and coordinator crash): {elapsed:.0f} s")

    expected = {
        "unenrolled": "not enrolled, or was revoked",
        "wrong-ca": "not signed by the bundle's CA",
        "plaintext": "requires TLS",
        "revoked": "not enrolled, or was revoked",
    }
    for name, process in refused.items():
        assert _wait_for_exit(process, 60) != 0
        last = (root / f"{name}.out").read_text().strip().splitlines()[-1]
        assert last.startswith("error:") and expected[name] in last, last

    listing = fedmodel("server", "nodes", "--dir", server).stdout
    assert "revoked" in listing and listing.count("online") == 2  # a and b; d is dead

    shown = fedmodel("server", "audit", "--dir", server)  # catches up with the log; checks chain
    assert shown.returncode == 0, shown.stderr
    audit = [json.loads(line) for line in (server / "audit.jsonl").read_text().splitlines()]
    events = [event["event"] for event in audit]
    assert events.count("enrolled") == 4 and events.count("revoked") == 1
    reasons = [event["reason"] for event in audit if event["event"] == "refused"]
    assert any("2004" in reason for reason in reasons)
    assert any("plaintext" in reason for reason in reasons)
    assert any(
        event.get("node") == "hospital-c" and event.get("node_status") == "revoked"
        for event in audit
        if event["event"] == "refused"
    )
    assert any(event.get("fingerprint") == strangers["unenrolled"].fingerprint for event in audit)
    assert "BEGIN" not in (server / "audit.jsonl").read_text()  # no key material


def merged_statistics(files: list[Path]) -> FeatureStatistics:
    """What the query round merges: each node's statistics of its whole file."""
    merged = table_statistics(files[0], "death")
    for path in files[1:]:
        merged = merged.merge(table_statistics(path, "death"))
    return merged


def test_client_start_checks_data_and_bundle_before_connecting(tmp_path: Path) -> None:
    pki = create_server_pki(tmp_path / "srv", ["127.0.0.1"])
    identity = create_node_identity(tmp_path / "node")
    bundle = tmp_path / "site.join"
    bundle.write_text(
        JoinBundle(
            "hospital-a", f"127.0.0.1:{free_port()}", pki.ca_certificate.read_text(),
            identity.fingerprint,
        ).to_json()
    )  # fmt: skip
    (tmp_path / "site.csv").write_text("age,death\n50,1\n60,0\n")
    (tmp_path / "junk.join").write_text("not a bundle")
    pin = ("--ca-fingerprint", pki.ca_fingerprint)
    cases = {
        "compare it with the CA fingerprint the operator read out": (
            "--join", bundle, "--data", tmp_path / "site.csv", "--label", "death"),
        "does not exist": (*pin, "--join", bundle, "--data", tmp_path / "none.csv",
                           "--label", "death"),
        "is a directory": (*pin, "--join", bundle, "--data", tmp_path, "--label", "death"),
        "label column 'outcome'": (*pin, "--join", bundle, "--data", tmp_path / "site.csv",
                                   "--label", "outcome"),
        "not a FedModel join bundle": (*pin, "--join", tmp_path / "junk.join", "--data",
                                       tmp_path / "site.csv", "--label", "death"),
        "no privacy budget yet": ("--join", bundle, "--data", tmp_path / "site.csv",
                                  "--label", "death"),  # the pin is stored by now
    }  # fmt: skip
    for message, args in cases.items():
        result = fedmodel("client", "start", "--dir", tmp_path / "node", *args, timeout=60)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert pki.ca_fingerprint in fedmodel("client", "status", "--dir", tmp_path / "node").stdout
    assert not (tmp_path / "node" / "supernode.log").exists()  # never tried to connect


def test_server_needs_tls_unless_explicitly_insecure(workspace: Workspace) -> None:
    server = workspace.path / "srv"
    ports = ("--fleet-port", free_port(), "--control-port", free_port())
    first = fedmodel("server", "init", "--dir", server, "--address", "127.0.0.1", *ports)
    assert first.returncode == 0, first.stderr
    again = fedmodel("server", "init", "--dir", server, "--address", "127.0.0.1")
    assert again.returncode != 0 and "pass --force" in again.stderr
    (server / "server.key").unlink()
    result = fedmodel("server", "start", "--dir", server)
    assert result.returncode != 0 and "server.key is missing" in result.stderr
    assert not (server / "superlink.pid").exists()
    insecure = fedmodel("server", "start", "--dir", server, "--insecure", "--detach", timeout=90)
    assert insecure.returncode == 0, insecure.stderr
    assert "WARNING: --insecure" in insecure.stderr and "NO node authentication" in insecure.stderr
    assert fedmodel("server", "stop", "--dir", server).stdout.startswith("SuperLink stopped")
