"""A deployed run never hangs: too few nodes end it cleanly, and stopping `fedmodel run`
stops the run on the SuperLink too; and the operator's console shows that federation.
The shared TLS federation of tests/conftest.py on 127.0.0.1 (three nodes); site-z
follows no plan here, so it is an honest node."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from fedmodel.runtime.processes import executable
from server.enrollment import verify_audit
from server.superlink import CONNECTION, Federation, server_environment
from tests.browser import save_screenshot
from tests.console import open_page, series, serving, table_rows
from tests.federation import (
    Workspace,
    background,
    federation_workspace,
    fedmodel,
    join_node,
    wait_for_text,
    wait_until_activated,
    wait_until_online,
    write_sites,
)
from tests.shared_federation.conftest import (
    HONEST_SITES,
    HOSTILE_SITE,
    SHARED_BUDGET,
    SharedFederation,
)

pytestmark = pytest.mark.slow
ONLINE = len(HONEST_SITES) + 1  # the shared nodes, site-z included
REVOKED = "site-r"  # the revocation test's own node


def run_statuses(server: Path) -> dict[int, str]:
    """Each run's status as the SuperLink reports it (`flwr ls`)."""
    listed = subprocess.run(
        [executable("flwr"), "ls", CONNECTION, "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=server,
        env=server_environment(Federation.load(server)),
    )  # fmt: skip
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return {int(run["run-id"]): run["status"] for run in json.loads(listed.stdout)["runs"]}


def start_waiting_run(
    space: Workspace, server: Path, output: Path
) -> tuple[subprocess.Popen[str], int]:
    """`fedmodel run` asking for one node more than are online: its ServerApp waits for
    it. Returns the process and the SuperLink's run id once the run has started."""
    output.parent.mkdir(parents=True, exist_ok=True)  # for its log, beside it
    run = background(
        "run", "--dir", server, "--min-clients", str(ONLINE + 1), "--output", output,
        log=output.with_suffix(".out"),
    )  # fmt: skip
    space.started.append(run)
    run_log = output / "engine" / "flwr-run.log"
    wait_for_text(run_log, "Successfully started run", run, 120)
    return run, int(run_log.read_text().split("Successfully started run ")[1].split()[0])


def final_status(server: Path, run_id: int) -> str:
    """The run's status once the SuperLink reports it finished (within a minute)."""
    deadline = time.monotonic() + 60
    while not (status := run_statuses(server)[run_id]).startswith("finished"):
        assert time.monotonic() < deadline, f"run {run_id} is still {status}"
        time.sleep(0.5)
    return status


def test_stopping_fedmodel_run_stops_its_run_on_the_superlink(
    shared_federation: SharedFederation, tmp_path: Path
) -> None:
    server = shared_federation.server
    wait_until_online(server, ONLINE)  # so the ServerApp below waits for the 4th node only
    with federation_workspace(tmp_path) as space:  # stops what the test started
        run, run_id = start_waiting_run(space, server, tmp_path / "waiting")
        run_log = tmp_path / "waiting" / "engine" / "flwr-run.log"
        wait_for_text(run_log, f"Waiting for nodes: {ONLINE} of {ONLINE + 1} connected", run, 120)
        assert run_statuses(server)[run_id].startswith("running")
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=180) == 130  # after asking the SuperLink to stop it
    assert "interrupted" in (tmp_path / "waiting.out").read_text()
    assert final_status(server, run_id) == "finished:stopped"


def test_a_revocation_below_min_clients_ends_the_run_cleanly(
    shared_federation: SharedFederation, tmp_path: Path
) -> None:
    """The node revoked is one the test joins itself; the shared nodes stay enrolled."""
    server = shared_federation.server
    with federation_workspace(tmp_path) as space:  # stops the test's run and its node
        # rows after those of the shared sites
        data = write_sites(tmp_path, [*HONEST_SITES, HOSTILE_SITE, REVOKED])[REVOKED]
        wait_until_activated(
            tmp_path / REVOKED, join_node(space, server, tmp_path / REVOKED, data, SHARED_BUDGET)
        )
        wait_until_online(server, ONLINE + 1)
        run = background(
            "run", "--dir", server, "--rounds", "20", "--min-clients", str(ONLINE + 1),
            "--round-timeout", "45", "--batch-size", "32", "--output", tmp_path / "revoked",
            log=tmp_path / "revoked.out",
        )  # fmt: skip
        space.started.append(run)
        # Once site-r answered round 1, its executor is paused, then site-r revoked: the
        # next round gets one reply fewer. (Revoked while uploading a reply, a node would
        # leave a half-sent reply that Flower 1.39's ServerApp keeps pulling for up to 2 hours.)
        wait_for_text(tmp_path / REVOKED / "executor.log", "train: answered", run, 180)
        executor = int((tmp_path / REVOKED / "executor.pid").read_text())
        os.killpg(executor, signal.SIGSTOP)
        try:
            revoked = fedmodel("server", "revoke", REVOKED, "--dir", server)
            assert revoked.returncode == 0, revoked.stderr
            started = time.monotonic()
            assert run.wait(timeout=180) == 0, (tmp_path / "revoked.out").read_text()
        finally:  # so that its node stops promptly, unless it stopped on its revocation
            with contextlib.suppress(ProcessLookupError):
                os.killpg(executor, signal.SIGCONT)
    summary = json.loads((tmp_path / "revoked" / "summary.json").read_text())
    assert summary["completed"]
    stop = summary["stopped_early"]
    # the round in flight times out without site-r, or the next one waits for a 4th node
    assert (
        f"only {ONLINE} clients trained in round" in stop
        or f"only {ONLINE} of the {ONLINE + 1} nodes" in stop
    ), stop
    assert len(summary["per_round"]) < 20
    print(f"run ended {time.monotonic() - started:.0f} s after the revocation: {stop}")


def test_the_console_shows_the_federation_over_tls_with_its_certificate(
    shared_federation: SharedFederation, browser: object
) -> None:
    """Served beyond the default (--bind, with a token), a federation's console speaks
    only TLS, with the certificate nodes already trust through the federation's CA; by
    default, on 127.0.0.1 alone, plain HTTP (shown in the browser)."""
    server, token = shared_federation.server, "federation-console-token"
    wait_until_online(server, ONLINE)  # an earlier test's run may have kept a node busy
    trusted = ssl.create_default_context(cafile=str(server / "ca.crt"))
    with serving(server, "--bind", "127.0.0.1", "--token", token) as url:
        assert url.startswith("https://127.0.0.1:")
        page = federation_page(
            lambda: urllib.request.urlopen(f"{url}federation?token={token}", context=trusted)
        )
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP
            urllib.request.urlopen(f"{url.replace('https', 'http', 1)}federation?token={token}")
    registry = json.loads((server / "nodes.json").read_text())
    nodes = {row[0]: row for row in table_rows(page, "nodes")}
    for site in (*HONEST_SITES, HOSTILE_SITE):
        name, node_id, status, last_seen, fingerprint = nodes[site][:5]
        assert (node_id, fingerprint) == (registry[site]["node_id"], registry[site]["fingerprint"])
        assert status == "online" and last_seen.startswith("now (online since")
    events, head = verify_audit(Federation.load(server))
    assert f"Verified: {len(events)} events; chain, MACs and recorded head intact." in page
    assert head in page
    shown = [row[1] for row in table_rows(page, "events")]
    assert shown == [event["event"] for event in reversed(events)]
    assert shown.count("enrolled") >= len(HONEST_SITES) + 1
    with serving(server) as url:
        assert url.startswith("http://127.0.0.1:")
        deadline = time.monotonic() + LIVE_STATUS_WAIT_S
        while True:  # each load asks the SuperLink afresh (see federation_page)
            browser.get(f"{url}federation")  # type: ignore[attr-defined]
            statuses = browser.find_elements(By.CSS_SELECTOR, "#nodes tr.node-online")  # type: ignore[attr-defined]
            if len(statuses) >= len(HONEST_SITES) + 1 or time.monotonic() > deadline:
                break
        assert len(statuses) >= len(HONEST_SITES) + 1
        save_screenshot(browser, "console-federation")


def test_the_console_follows_a_deployed_run_and_shows_what_its_nodes_released(
    shared_federation: SharedFederation, browser: object, tmp_path: Path
) -> None:
    """A run on the live federation, written where `fedmodel run` writes (the federation's
    runs/): its page follows it to the end without a reload, charts the nodes' scores and
    each node's epsilon by name, and its privacy page shows what each node released."""
    server = shared_federation.server
    wait_until_online(server, ONLINE)
    run_dir = server / "runs" / "followed"
    with federation_workspace(tmp_path) as space, serving(server) as url:
        run = background(
            "run", "--dir", server, "--rounds", "2", "--min-clients", str(ONLINE),
            "--batch-size", "32", "--output", run_dir, log=tmp_path / "followed.out",
        )  # fmt: skip
        space.started.append(run)
        WebDriverWait(browser, 300, poll_frequency=0.2).until(
            lambda _: (run_dir / "config.json").exists() or run.poll() is not None
        )
        browser.get(f"{url}runs/followed")  # type: ignore[attr-defined]
        first_status = browser.find_element(By.ID, "status").text  # type: ignore[attr-defined]
        browser.execute_script("window.sameDocument = true")  # type: ignore[attr-defined]
        WebDriverWait(browser, 400, poll_frequency=0.5).until(
            lambda driver: driver.find_element(By.ID, "status").text == "completed"  # type: ignore[attr-defined]
        )
        assert run.wait(timeout=120) == 0, (tmp_path / "followed.out").read_text()
        assert browser.execute_script("return window.sameDocument === true"), "it reloaded"  # type: ignore[attr-defined]
        assert first_status in ("starting", "running", "completed")
        assert browser.find_element(By.ID, "rounds").text == "2/2"  # type: ignore[attr-defined]
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = summary["per_round"]
        assert series(browser, "metrics-chart")["AUROC"] == pytest.approx(
            [row["auroc"] for row in rows]
        )
        nodes = {client["node"]: client for client in summary["clients"]}
        assert (
            sorted(series(browser, "epsilon-chart"))
            == sorted(nodes)
            == sorted((*HONEST_SITES, HOSTILE_SITE))
        )
        save_screenshot(browser, "console-deployed-run")
        open_page(browser, f"{url}runs/followed/privacy", "#released tbody tr", len(nodes))
        page = browser.page_source  # type: ignore[attr-defined]
        shown = browser.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
    released = {row[0]: row for row in table_rows(page, "released")}
    assert sorted(released) == sorted(nodes), f"the privacy page showed:\n{shown}"
    for name, client in nodes.items():  # as the node released them with its replies
        budget = client["budget"]
        assert budget["epsilon"] == SHARED_BUDGET, client
        assert released[name][1:4] == [
            f"{SHARED_BUDGET:.3f}", f"{client['epsilon']:.4f}", f"{budget['left']:.4f}"
        ]  # fmt: skip


# The console asks the SuperLink's Control API for live status on each page load; on a
# loaded machine that call can fail, and the page then shows the registry alone.
LIVE_STATUS_WAIT_S = 120


def federation_page(fetch: Callable[[], Any]) -> str:
    """The Federation page once it shows live status (the SuperLink answered)."""
    deadline = time.monotonic() + LIVE_STATUS_WAIT_S
    while True:
        with fetch() as reply:
            page = str(reply.read().decode())
        if 'class="node-online"' in page or time.monotonic() > deadline:
            return page
