"""A deployed run never hangs: too few nodes end it cleanly, and stopping `fedmodel run`
stops the run on the SuperLink too. A real TLS federation of two nodes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmodel.runtime.processes import executable
from server.superlink import CONNECTION, Federation, server_environment
from tests.federation import (
    Workspace,
    background,
    fedmodel,
    join_node,
    served_federation,
    wait_for_text,
    wait_until_online,
    write_sites,
)

pytestmark = pytest.mark.slow
SITES = ["site-a", "site-b"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("liveness")
    with served_federation(root) as (space, server):
        data = write_sites(root, SITES)
        for site in SITES:
            join_node(space, server, root / site, data[site], budget_epsilon=10)
        wait_until_online(server, len(SITES))
        yield space


def run_statuses(server: Path) -> dict[int, str]:
    """Each run's status as the SuperLink reports it (`flwr ls`)."""
    listed = subprocess.run(
        [executable("flwr"), "ls", CONNECTION, "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=server,
        env=server_environment(Federation.load(server)),
    )  # fmt: skip
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return {int(run["run-id"]): run["status"] for run in json.loads(listed.stdout)["runs"]}


def test_stopping_fedmodel_run_stops_its_run_on_the_superlink(federation: Workspace) -> None:
    root, server = federation.path, federation.path / "srv"
    # three nodes asked for, two enrolled: the ServerApp waits for the third
    run = background(
        "run", "--dir", server, "--min-clients", "3", "--output", root / "waiting",
        log=root / "waiting.out",
    )  # fmt: skip
    federation.started.append(run)
    run_log = root / "waiting" / "engine" / "flwr-run.log"
    wait_for_text(run_log, "Successfully started run", run, 120)
    wait_for_text(run_log, "Waiting for nodes: 2 of 3 connected", run, 120)
    run_id = int(run_log.read_text().split("Successfully started run ")[1].split()[0])
    assert run_statuses(server)[run_id].startswith("running")
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=90) == 130
    assert "interrupted" in (root / "waiting.out").read_text()
    deadline = time.monotonic() + 60
    while not (status := run_statuses(server)[run_id]).startswith("finished"):
        assert time.monotonic() < deadline, f"run {run_id} is still {status}"
        time.sleep(0.5)
    assert status == "finished:stopped"


def test_a_revocation_below_min_clients_ends_the_run_cleanly(federation: Workspace) -> None:
    root, server = federation.path, federation.path / "srv"
    run = background(
        "run", "--dir", server, "--rounds", "20", "--min-clients", "2", "--round-timeout", "15",
        "--batch-size", "32", "--output", root / "revoked", log=root / "revoked.out",
    )  # fmt: skip
    federation.started.append(run)
    # Once both answered round 1, site-b's executor is paused, then site-b revoked:
    # round 2 gets one reply. (Revoked while uploading a reply, a node would leave a
    # half-sent reply that Flower 1.39's ServerApp keeps pulling for up to 2 hours.)
    for site in SITES:
        wait_for_text(root / site / "executor.log", "train: answered", run, 180)
    os.killpg(int((root / "site-b" / "executor.pid").read_text()), signal.SIGSTOP)
    revoked = fedmodel("server", "revoke", "site-b", "--dir", server)
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    assert run.wait(timeout=180) == 0, (root / "revoked.out").read_text()
    summary = json.loads((root / "revoked" / "summary.json").read_text())
    assert summary["completed"]
    stop = summary["stopped_early"]
    # the round in flight times out with one reply, or the next one waits for a 2nd node
    assert "only 1 clients trained in round" in stop or "only 1 of the 2 nodes" in stop, stop
    assert len(summary["per_round"]) < 20
    print(f"run ended {time.monotonic() - started:.0f} s after the revocation: {stop}")
