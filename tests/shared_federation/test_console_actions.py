"""The console's actions against a live federation: revoking a node, stopping a run.

The node revoked is one the test enrolls itself (a key and an enrollment, as `client
init` and `server enroll` make them; no SuperNode needs to run, since Flower's registry
is what a revocation changes), so the shared nodes stay enrolled. The run stopped waits
for one node more than are online, as test_run_liveness.py's stop test (Ctrl-C on
`fedmodel run`) does; the console's refusals are tested without a federation in
tests/test_console.py.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedmodel.pki import create_node_identity
from server.enrollment import enroll_node, flwr_cli, load_registry, verify_audit
from server.superlink import Federation
from tests.console import serving, table_rows
from tests.federation import federation_workspace
from tests.shared_federation.conftest import SharedFederation
from tests.shared_federation.test_run_liveness import final_status, start_waiting_run

pytestmark = pytest.mark.slow
TOKEN = "console-actions-token"
NODE = "console-r"


def post(url: str, form: str, **headers: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=form.encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_node_revoked_from_the_console_is_revoked_logged_and_shown(
    shared_federation: SharedFederation, tmp_path: Path
) -> None:
    server = shared_federation.server
    federation = Federation.load(server)
    node = create_node_identity(tmp_path / NODE)  # as `client init` makes it
    entry, _ = enroll_node(federation, node.public_key, NODE)
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    with serving(server, "--allow-actions", "--token", TOKEN) as url:
        revoke = f"{url}federation/nodes/{NODE}/revoke"
        assert post(revoke, f"confirm={NODE}")[0] == 401
        assert post(revoke, "confirm=console-t", **bearer) == (
            400, f"type the node's name ('{NODE}') to confirm"
        )  # fmt: skip
        assert load_registry(federation)[NODE]["status"] == "enrolled"
        code, page = post(revoke, f"confirm={NODE}", **bearer)
        assert code == 200, page
        with urllib.request.urlopen(
            urllib.request.Request(f"{url}federation", headers=bearer)
        ) as reply:
            federation_page = reply.read().decode()

    revoked = load_registry(federation)[NODE]
    assert revoked["status"] == "revoked"
    assert (
        f"Node {entry['node_id']} ({node.fingerprint}) was revoked at {revoked['revoked_at']}"
        in page
    )
    live = flwr_cli(federation, "supernode", "list")["nodes"]
    assert [n["status"] for n in live if str(n["node-id"]) == entry["node_id"]] == ["unregistered"]
    events, _ = verify_audit(federation)  # still verifies: chain, MACs, recorded head
    logged = [
        (e["node"], e["node_id"], e["fingerprint"]) for e in events if e["event"] == "revoked"
    ]
    assert logged[-1] == (NODE, entry["node_id"], node.fingerprint)
    assert 'id="log-verdict" class="verified"' in federation_page
    shown = {row[0]: row for row in table_rows(federation_page, "nodes")}
    assert shown[NODE][1:3] == [entry["node_id"], "revoked"]
    assert shown[NODE][4] == node.fingerprint
    details = [row[2] for row in table_rows(federation_page, "events") if row[1] == "revoked"]
    assert f"node={NODE} node_id={entry['node_id']}" in details[0]  # newest first


def test_a_deployed_run_stopped_from_the_console_stops_on_the_superlink(
    shared_federation: SharedFederation, tmp_path: Path
) -> None:
    server, runs = shared_federation.server, tmp_path / "runs"
    with federation_workspace(tmp_path) as space:  # stops what the test started
        run, run_id = start_waiting_run(space, server, runs / "waiting")
        with serving(runs, "--allow-actions", "--token", TOKEN) as url:
            code, reply = post(f"{url}api/runs/waiting/stop", "", Authorization=f"Bearer {TOKEN}")
        assert code == 200, reply
        assert json.loads(reply)["superlink_run_id"] == run_id
        assert final_status(server, run_id) == "finished:stopped"
        assert run.wait(timeout=90) != 0  # `fedmodel run` saw its run end incomplete
    assert "error: the run did not complete" in (runs / "waiting.out").read_text()
