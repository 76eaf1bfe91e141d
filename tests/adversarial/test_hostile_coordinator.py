"""The test plays a hostile coordinator against a real node on 127.0.0.1.

One TLS federation (`fedmodel server init/start`) and one enrolled data owner
(`fedmodel client init --budget-epsilon 3`, `client start`), whose node runs FedModel
from a copy of the source tree, so that a test can change the installed code. The
coordinator submits its own Flower App (tests/adversarial/hostileapp, with a ClientApp
that would leak a raw row) through `flwr run`, with run configs of its choosing, and
FedModel's own app through `fedmodel run`. Every request the owner's policy forbids is
refused with a reason, nothing of the coordinator's code runs on the node, and the node
goes on serving an honest run within its budget.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from flwr.cli.app import app as flwr_command
from typer.testing import CliRunner

import fedmodel
from fedmodel.audit_log import AuditLog
from fedmodel.protocol import POLICY_REFUSED_CODE
from server.superlink import CONNECTION, Federation, server_environment
from tests.conftest import dp_accounting_epsilon
from tests.federation import Site, copy_source_tree, joined_federation
from tests.federation import (
    fedmodel as fedmodel_cli,
)

pytestmark = pytest.mark.slow

BUDGET = 3.0
SITE = "site-a"
HONEST = {"app-task": "fedmodel-tabular", "app-task-version": fedmodel.__version__}


@dataclasses.dataclass
class Coordinator:
    """The test's hostile coordinator and what it can see of the node."""

    root: Path
    server: Path
    node: Path
    code: Path  # the node's installed FedModel
    refusals: int = 0

    @property
    def marker(self) -> Path:
        return self.root / "foreign-code-ran"

    def submit(self, message_type: str = "train", **config: str | float | int) -> dict:
        """`flwr run` the hostile app with `config`; the node's one reply, as recorded."""
        (reply,) = self.submit_all([(message_type, config)])
        return reply

    def submit_all(self, runs: list[tuple[str, dict[str, str | float | int]]]) -> list[dict]:
        """Submit the runs one by one, each once the node answered the one before (it
        answers them in turn anyway); their replies in order.

        Each run starts a ServerApp process, and Flower launches again any that has not
        reached the SuperLink within 30 s: nine started at once on a loaded machine miss
        that, and every launch slows the others (80 processes for nine runs, seen here).
        """
        environment = server_environment(Federation.load(self.server))
        replies = []
        for number, (message_type, config) in enumerate(runs):
            report = self.root / f"report-{number}.json"
            report.unlink(missing_ok=True)
            self._start(report, message_type, config, environment)
            deadline = time.monotonic() + 180
            while not report.exists():
                assert time.monotonic() < deadline, f"the hostile ServerApp {number} never reported"
                time.sleep(0.2)
            replies.append(json.loads(report.read_text())[0])
        self.refusals += sum(reply.get("error_code") == POLICY_REFUSED_CODE for reply in replies)
        return replies

    def _start(
        self,
        report: Path,
        message_type: str,
        config: dict[str, str | float | int],
        environment: dict[str, str],
    ) -> None:
        """`flwr run` the hostile app, its ServerApp to write the node's reply to `report`.

        Flower's own `flwr` command, run in this process: its own interpreter would
        spend about 2 s of CPU importing the CLI, for each run.
        """
        values = {
            "report-path": str(report),
            "marker-path": str(self.marker),
            "message-type": message_type,
            **config,
        }
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())
        submitted = CliRunner().invoke(
            flwr_command,
            ["run", str(self.root / "hostileapp"), CONNECTION, "--run-config", overrides],
            env=environment,
        )
        assert submitted.exit_code == 0, (submitted.output, submitted.exception)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    root = tmp_path_factory.mktemp("hostile")
    code = root / "code"
    copy_source_tree(code)
    shutil.copytree(Path(__file__).parent / "hostileapp", root / "hostileapp")
    with joined_federation(root, [Site(SITE, BUDGET, code=code)], rows=300) as (_, server):
        yield Coordinator(root, server, root / SITE, code)
        assert not (root / "foreign-code-ran").exists()


def test_the_owner_sees_its_running_node_and_its_policy(coordinator: Coordinator) -> None:
    shown = fedmodel_cli("client", "status", "--dir", coordinator.node)
    assert shown.returncode == 0, shown.stderr
    assert "SuperNode: running" in shown.stdout and "Executor: running" in shown.stdout
    assert "budget epsilon 3 at delta 1e-05; DP-SGD required" in shown.stdout
    assert "Approved: fedmodel-tabular" in shown.stdout and "(ok)" in shown.stdout


def test_only_the_owners_executor_can_take_the_nodes_tasks(coordinator: Coordinator) -> None:
    """A local process without the 0600 secret cannot acquire tasks from the Runtime API."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    from client.executor import local_retry_invoker

    secret = coordinator.node / "superexec.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pid = int((coordinator.node / "supernode.pid").read_text())
    arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    port = arguments[arguments.index("--port") + 1]
    for guess in (None, b"not the secret"):
        interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if guess is not None:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=guess,
                    protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}),
                )
            )
        intruder = RuntimeHttpClient.from_server_address(
            server_address=f"127.0.0.1:{port}", insecure=True, root_certificates=None,
            interceptors=interceptors, retry_invoker=local_retry_invoker(max_time=5),
        )  # fmt: skip
        with pytest.raises(httpx.HTTPStatusError, match="401"):
            intruder.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
        intruder.close()


def test_a_foreign_app_never_runs_on_the_node(coordinator: Coordinator) -> None:
    # A run that names no installed task is refused outright.
    reply = coordinator.submit()
    assert reply["error_code"] == POLICY_REFUSED_CODE
    assert "names no task installed on this node" in reply["reason"]
    # Claiming FedModel's approved task does not make the node run the app's ClientApp:
    # it runs its own installed one, which cannot make sense of the message.
    reply = coordinator.submit(**HONEST)
    assert reply["error_code"] != POLICY_REFUSED_CODE and "content" not in reply
    assert reply["reason"] == "the node failed to run the task"  # nothing about the data
    assert not coordinator.marker.exists()


# What a hostile coordinator asks for, and the reason the node gives for refusing it
BEYOND_POLICY = [
    ({"dp": "off"}, "asks for DP mode 'off', but the owner requires DP-SGD"),
    # client-level noise instead of DP-SGD: the owner never accepted it
    ({"dp": "distributed"}, "asks for distributed DP (no DP-SGD"),
    ({"delta": 0.5}, "delta 0.5 is above the owner's delta 1e-05"),
    ({"epsilon": 50.0}, "plans epsilon 50, above the owner's whole budget 3"),
    ({"local-epochs": 6}, "asks for 6 local epochs; the owner allows at most 5"),
    ({"rounds": 101}, "asks for 101 rounds; the owner allows at most 100"),
    ({"app-task-version": "9.9.9"}, "task 'fedmodel-tabular' version 9.9.9 is not approved"),
    ({"app-task": "mallory-stealer"}, "task 'mallory-stealer' version"),
    # code on the node's path, named as module:attribute instead of an installed task
    ({"app-task": "os:system"}, "task 'os:system' version"),
]


def test_requests_beyond_the_owners_policy_are_refused(coordinator: Coordinator) -> None:
    replies = coordinator.submit_all(
        [("query", {**HONEST, **request}) for request, _ in BEYOND_POLICY]
    )
    for (request, reason), reply in zip(BEYOND_POLICY, replies, strict=True):
        assert reply.get("error_code") == POLICY_REFUSED_CODE, (request, reply)
        assert reason in reply["reason"], (request, reply)
        assert "content" not in reply  # no statistics, no row: nothing but the reason


def test_an_approved_task_whose_source_changed_is_refused(coordinator: Coordinator) -> None:
    source = coordinator.code / "client" / "app.py"
    original = source.read_bytes()
    source.write_bytes(original + b"\n# one line the owner never reviewed\n")
    try:
        reply = coordinator.submit("query", **HONEST)
    finally:
        source.write_bytes(original)
    assert reply["error_code"] == POLICY_REFUSED_CODE
    assert "changed since the owner approved it" in reply["reason"]
    reply = coordinator.submit("query", **HONEST)  # the reviewed source is served again
    assert "content" in reply and "statistics" in reply["content"]


def test_the_operator_sees_refusals_and_an_honest_run_stays_in_budget(
    coordinator: Coordinator,
) -> None:
    server = coordinator.server
    common = ("run", "--dir", server, "--rounds", "1", "--min-clients", "1", "--batch-size", "32")
    refused = fedmodel_cli(*common, "--dp", "off", "--output", coordinator.root / "off")
    coordinator.refusals += 1
    assert refused.returncode != 0
    assert f"refused by node {SITE}: the run asks for DP mode 'off'" in refused.stdout
    assert "only 0 of 1 nodes described their data" in refused.stderr  # why the run ended

    honest = fedmodel_cli(*common, "--epsilon", "1.0", "--output", coordinator.root / "run")
    assert honest.returncode == 0, honest.stdout + honest.stderr
    summary = json.loads((coordinator.root / "run" / "summary.json").read_text())
    (client,) = summary["clients"]
    assert client["delta"] == 1e-5 and 0 < client["epsilon"] <= 1.0 + 1e-6
    assert client["num_examples"] % 10 == 0  # released rounded
    assert all(row["train_loss"] is None for row in summary["per_round"])  # withheld

    # Everything this dataset ever spent, recomputed independently at the owner's delta
    from fedmodel.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(coordinator.node / "privacy-ledger.sqlite")
    (fingerprint,) = {entry.fingerprint for entry in ledger.entries()}
    history = ledger.spent_history(fingerprint)
    assert dp_accounting_epsilon(history, 1e-5) <= BUDGET
    # its calibration was cached inside the 0700 node directory, not in a shared cache
    assert (coordinator.node / "accounting-cache" / "accounting.sqlite").is_file()

    events = AuditLog(coordinator.node / "node-audit.jsonl").verify()
    assert sum(event["event"] == "refused" for event in events) == coordinator.refusals
    assert sum(event["event"] == "served" for event in events) >= 3  # query, train, evaluate


def test_a_replayed_round_is_refused(coordinator: Coordinator) -> None:
    """Round 1 of the honest run, asked for again, would average away the node's noise."""
    summary = json.loads((coordinator.root / "run" / "summary.json").read_text())
    replayed = {**HONEST, "run-uid": summary["config"]["run_uid"], "epsilon": 1.0}
    reply = coordinator.submit("train", **replayed)
    assert reply["error_code"] == POLICY_REFUSED_CODE
    assert reply["reason"].startswith("replayed-round: round 1 of run ")
    fresh = coordinator.submit("train", **{**replayed, "run-uid": "another-run"})
    assert fresh.get("error_code") != POLICY_REFUSED_CODE  # a new run's round 1 is no replay


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_node_whose_ledger_lost_entries_does_not_start(
    coordinator: Coordinator, damage: str
) -> None:
    """The policy file keeps the ledger's chain head; a ledger behind it is refused."""
    import sqlite3

    node = coordinator.root / f"copy-{damage}"
    shutil.copytree(coordinator.node, node, ignore=shutil.ignore_patterns("*.pid", "*.log"))
    policy = json.loads((node / "policy.json").read_text())
    assert policy["ledger_entries"] >= 2  # the honest run's round: pending + committed
    ledger = node / "privacy-ledger.sqlite"
    if damage == "delete":
        for path in node.glob("privacy-ledger.sqlite*"):
            path.unlink()
        expected = "privacy-ledger.sqlite is missing, but this node's policy records"
    else:
        with sqlite3.connect(ledger) as connection:
            connection.execute("DELETE FROM entries WHERE seq > 1")
        expected = "holds 1 entries, but this node's policy records"
    started = fedmodel_cli(
        "client", "start", "--dir", node, "--join", coordinator.server / "bundles" / f"{SITE}.join",
        "--data", coordinator.root / f"{SITE}.csv", "--label", "death", "--device", "cpu",
        timeout=60,
    )  # fmt: skip
    assert started.returncode == 2, started.stdout + started.stderr
    assert expected in " ".join(started.stderr.split())
    assert "Traceback" not in started.stderr
    assert not (node / "supernode.pid").exists()
