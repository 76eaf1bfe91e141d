"""`fedmodel console` in a real browser, over a real simulation it watches while it runs.

One console process serves the module's runs directory; one 2-round simulation of three
hospitals runs into it. The run page is opened while the simulation trains, and must
show its results without a reload; every number checked on a page is the one the run's
own files (or `fedmodel audit`'s library function) give.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import sqlite3
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fedmodel.canaries import EmpiricalAudit, one_run_epsilon_lower_bound
from fedmodel.cli.console import console_command
from fedmodel.config.run_config import RunConfig
from fedmodel.console.federation import _with_last_seen
from fedmodel.errors import ConfigError
from fedmodel.pki import create_node_identity
from fedmodel.privacy.audit import audit
from fedmodel.runtime.processes import free_port
from server.enrollment import append_audit, registry_lock, save_registry
from server.superlink import init_federation
from tests.browser import save_screenshot
from tests.console import FEDMODEL, fetch, open_page, series, serving, table_rows
from tests.test_enrollment import superlink_2004_line

TOKEN = "console-test-token"
RUN = "hospitals"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def console_url(runs_root: Path) -> Iterator[str]:
    with serving(runs_root) as url:
        yield url


@pytest.fixture(scope="module")
def simulation(runs_root: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Three hospitals, two rounds, with baselines: started, not waited for."""
    log = (runs_root.parent / "simulation.log").open("w")
    process = subprocess.Popen(
        [*FEDMODEL, "simulate", "medical", "--clients", "3", "--rounds", "2",
         "--output", str(runs_root / RUN)],
        stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    yield process, runs_root / RUN
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=60)
    log.close()


@pytest.fixture(scope="module")
def finished_run(simulation: tuple[subprocess.Popen[str], Path]) -> Path:
    process, run_dir = simulation
    assert process.wait(timeout=900) == 0, (run_dir.parent.parent / "simulation.log").read_text()
    return run_dir


@pytest.fixture(scope="module")
def tampered_run(finished_run: Path) -> Path:
    """A copy of the run whose client-1 ledger reports half the epsilon it last spent."""
    copy = finished_run.parent / "tampered"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("engine", "checkpoints"))
    with sqlite3.connect(copy / "ledgers" / "client-1.sqlite") as ledger:
        ledger.execute("UPDATE entries SET epsilon = epsilon / 2 WHERE seq = (SELECT MAX(seq) "
                       "FROM entries)")  # fmt: skip
    return copy


NODES = ("hospital-a", "hospital-b", "hospital-c")  # the simulation's clients 0, 1, 2
REVOKED = "hospital-r"  # enrolled, revoked, refused since; in no run


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation directory as `server init`, `server enroll` and `server revoke` leave
    it (no SuperLink started): four nodes, one revoked, whose key the SuperLink's log then
    shows refused three times, besides two plaintext handshakes and one keyless node."""
    root = tmp_path_factory.mktemp("federation")
    federation, _ = init_federation(
        root / "fed", ["127.0.0.1"], fleet_port=free_port(), control_port=free_port()
    )
    nodes = {name: create_node_identity(root / name) for name in (*NODES, REVOKED)}
    registry = {}
    for number, (name, node) in enumerate(nodes.items()):
        registry[name] = {
            "name": name, "node_id": str(1000 + number), "fingerprint": node.fingerprint,
            "status": "enrolled", "enrolled_at": f"2026-11-0{number + 1}T10:00:00Z",
            "max_rows": None,
        }  # fmt: skip
    registry[REVOKED] |= {"status": "revoked", "revoked_at": "2026-11-05T10:00:00Z"}
    with registry_lock(federation):
        save_registry(federation, registry)
        for entry in registry.values():
            append_audit(federation, "enrolled", node=entry["name"], node_id=entry["node_id"],
                         fingerprint=entry["fingerprint"], max_rows=None)  # fmt: skip
        append_audit(federation, "revoked", node=REVOKED, node_id=registry[REVOKED]["node_id"],
                     fingerprint=registry[REVOKED]["fingerprint"])  # fmt: skip
    plaintext = (
        "I1128 14:58:19.555948 17611 ssl_transport_security.cc:2563] Handshake failed with "
        "error SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER"
    )
    keyless = "ERROR : [/flwr.proto.Fleet/ActivateNode][ApiError:2001] no key"
    refused = superlink_2004_line(nodes[REVOKED].public_key)
    lines = ["INFO : started", refused, plaintext, refused, keyless, plaintext, refused]
    federation.path("superlink.log").write_text("\n".join(lines) + "\n")
    return federation.directory


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_the_run_page_follows_a_running_simulation_and_shows_its_results_without_a_reload(
    browser: object, console_url: str, simulation: tuple[subprocess.Popen[str], Path]
) -> None:
    process, run_dir = simulation
    WebDriverWait(browser, 300, poll_frequency=0.2).until(
        lambda _: (run_dir / "config.json").exists() or process.poll() is not None
    )
    browser.get(f"{console_url}runs/{RUN}")  # type: ignore[attr-defined]
    WebDriverWait(browser, 60).until(
        lambda driver: driver.execute_script("return document.readyState") == "complete"  # type: ignore[attr-defined]
    )
    assert browser.find_elements(By.ID, "no-baselines"), browser.page_source  # type: ignore[attr-defined]
    first_status = browser.find_element(By.ID, "status").text  # type: ignore[attr-defined]
    browser.execute_script("window.sameDocument = true")  # type: ignore[attr-defined]

    WebDriverWait(browser, 900, poll_frequency=0.5).until(  # report.md: the harness's last file
        lambda driver: (
            driver.find_elements(By.ID, "baselines")  # type: ignore[attr-defined]
            and driver.find_elements(By.LINK_TEXT, "report.md")
        )  # type: ignore[attr-defined]
    )

    assert browser.execute_script("return window.sameDocument === true"), "the page reloaded"  # type: ignore[attr-defined]
    assert first_status in ("starting", "running", "completed")
    assert browser.find_element(By.ID, "status").text == "completed"  # type: ignore[attr-defined]
    assert browser.find_element(By.ID, "rounds").text == "2/2"  # type: ignore[attr-defined]
    summary = summary_of(run_dir)
    metrics = series(browser, "metrics-chart")
    assert metrics["AUROC"] == pytest.approx([row["auroc"] for row in summary["per_round"]])
    assert metrics["loss"] == pytest.approx([row["loss"] for row in summary["per_round"]])
    epsilon = series(browser, "epsilon-chart")
    assert epsilon == {
        client["client"]: pytest.approx([value for _, value in client["epsilon_by_round"]])
        for client in summary["clients"]
    }
    federated = browser.find_element(By.CSS_SELECTOR, "#baselines tbody tr").text  # type: ignore[attr-defined]
    assert federated.startswith("federated (DP)")
    assert f"{summary['final']['auroc']:.4f}" in federated
    central = summary["baselines"]["central"]["auroc"]
    assert f"central, no DP {central:.4f}" in browser.find_element(By.ID, "baselines").text  # type: ignore[attr-defined]
    rows = browser.find_elements(By.CSS_SELECTOR, "#heterogeneity tbody tr")  # type: ignore[attr-defined]
    assert len(rows) == 3
    links = {a.text: a.get_attribute("href") for a in browser.find_elements(By.TAG_NAME, "a")}  # type: ignore[attr-defined]
    with urllib.request.urlopen(links["summary.json"]) as response:
        assert json.loads(response.read()) == summary
    with urllib.request.urlopen(links["report.md"]) as response:
        assert response.read() == (run_dir / "report.md").read_bytes()
    save_screenshot(browser, "console-run")


@pytest.mark.slow
def test_the_privacy_page_shows_each_owner_and_highlights_a_failed_audit(
    browser: object, console_url: str, tampered_run: Path
) -> None:
    failed = audit(tampered_run)  # the oracle for both pages: the edit changed no mechanism
    owners = [owner for ledger in failed.ledgers for owner in ledger.owners]
    open_page(browser, f"{console_url}runs/{RUN}/privacy", "#owners tbody tr", len(owners))
    rows = browser.find_elements(By.CSS_SELECTOR, "#owners tbody tr")  # type: ignore[attr-defined]
    assert len(rows) == len(owners) == 3
    for row, owner in zip(rows, owners, strict=True):
        cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        assert cells[0] == owner.owner
        assert cells[1:5] == [
            f"{owner.budget_epsilon:.3f}", f"{owner.spent_epsilon:.4f}",
            f"{owner.pld_epsilon:.4f}", f"{owner.remaining:.4f}",
        ]  # fmt: skip
        assert cells[-1] == "ok"
    assert browser.find_element(By.ID, "verdict").text.startswith("Verified: 3 owners")  # type: ignore[attr-defined]
    save_screenshot(browser, "console-privacy")

    open_page(browser, f"{console_url}runs/tampered/privacy", "#owners tbody tr.failed")
    assert not failed.ok
    verdict = browser.find_element(By.ID, "verdict")  # type: ignore[attr-defined]
    assert "failed" in verdict.get_attribute("class")
    shown = [item.text for item in verdict.find_elements(By.TAG_NAME, "li")]
    assert shown == failed.all_problems()
    flagged = browser.find_elements(By.CSS_SELECTOR, "#owners tbody tr.failed td:first-child")  # type: ignore[attr-defined]
    assert [cell.text for cell in flagged] == ["client-1"]
    save_screenshot(browser, "console-privacy-failed")


@pytest.mark.slow
def test_the_run_page_lists_each_refused_round_and_rejected_update_with_its_reason(
    console_url: str, finished_run: Path
) -> None:
    """What summary.json records of a node's refusal or a rejected update is listed on the
    run's page, escaped; a run without either says so."""
    copy = finished_run.parent / "refusing"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("engine", "checkpoints"))
    summary = summary_of(copy)
    summary["dropouts"] = [{"round": 2, "node_id": 7, "client": "1", "reason": "budget <spent>"}]
    summary["rejected_updates"] = [{"round": 1, "node_id": 9, "client": None, "reason": "NaN"}]
    (copy / "summary.json").write_text(json.dumps(summary))

    def results(name: str) -> str:
        with urllib.request.urlopen(f"{console_url}runs/{name}/results") as reply:
            return str(reply.read().decode())

    assert 'id="no-refusals"' in results(RUN)
    try:
        page = results("refusing")
    finally:  # the compare test counts the module's runs
        shutil.rmtree(copy)
    assert table_rows(page, "refusals") == [
        ["2", "1", "refused by its node", "budget <spent>"],
        ["1", "node 9", "rejected by the coordinator", "NaN"],
    ]
    assert "budget &lt;spent&gt;" in page


@pytest.mark.slow
def test_the_compare_page_puts_runs_side_by_side_and_plots_epsilon_against_auroc(
    browser: object, console_url: str, finished_run: Path, tampered_run: Path
) -> None:
    browser.get(console_url)  # type: ignore[attr-defined]
    listed = [
        a.text for a in browser.find_elements(By.CSS_SELECTOR, "#runs tbody td:first-child a")
    ]  # type: ignore[attr-defined]
    assert listed == [RUN, "tampered"]
    save_screenshot(browser, "console-runs")

    browser.get(f"{console_url}compare")  # type: ignore[attr-defined]
    rows = browser.find_elements(By.CSS_SELECTOR, "#compare tbody tr")  # type: ignore[attr-defined]
    assert len(rows) == 2
    summary = summary_of(finished_run)
    assert f"AUROC {summary['final']['auroc']:.4f}" in rows[0].text
    points = browser.execute_script(  # type: ignore[attr-defined]
        "return Chart.getChart('privacy-utility').data.datasets.map(d => [d.label, d.data[0]])"
    )
    epsilon = max(client["epsilon"] for client in summary["clients"])
    label, point = points[0]
    assert label == f"{RUN} (AUROC)"
    assert (point["x"], point["y"]) == pytest.approx((epsilon, summary["final"]["auroc"]))
    save_screenshot(browser, "console-compare")


def deployed_copy(
    run_dir: Path, target: Path, withheld: str, refused: dict[int, list[str]]
) -> Path:
    """`run_dir` as `fedmodel run` would have left it on NODES: no ledger (each stays on
    its node), the clients named by node as server/deployment.py names them, the budget
    of node `withheld` not released, and the rounds `refused` (client number -> the
    reason its node gave, per round) recorded as the coordinator records a refusal."""
    shutil.copytree(
        run_dir, target, ignore=shutil.ignore_patterns("engine", "checkpoints", "ledgers")
    )
    summary = summary_of(target)
    summary["scenario"] = summary["config"]["scenario"] = "deployment"
    for client in summary["clients"]:
        client |= {
            "node": NODES[int(client["client"])],
            "node_id": str(1000 + int(client["client"])),
        }
        if client["node"] == withheld:
            client["budget"] = None
    summary["dropouts"] = [
        {"round": number, "node_id": 1000 + client, "client": str(client), "reason": reason}
        for client, reasons in refused.items()
        for number, reason in enumerate(reasons, start=1)
    ]
    (target / "summary.json").write_text(json.dumps(summary))
    (target / "nodes.json").write_text(json.dumps({name: n for n, name in enumerate(NODES)}))
    return target


@pytest.mark.slow
def test_a_deployed_runs_privacy_shows_each_nodes_released_budget_and_the_federation_the_latest(
    browser: object, finished_run: Path, federation: Path
) -> None:
    """A deployed run's directory holds no owner's ledger: its privacy page shows, by node,
    what each node released with its train replies, and 'not released' where one withheld
    it; the Federation page each enrolled node's latest release over runs/. The releases
    are the simulation's clients' own (real Opacus): they must agree with their ledgers."""
    owners = {o.owner: o for ledger in audit(finished_run).ledgers for o in ledger.owners}
    epochs = "the run asks for 6 local epochs; the owner allows at most 5"
    dp_off = "the run asks for DP mode 'off', but the owner requires DP-SGD"
    older = deployed_copy(
        finished_run, federation / "runs" / "older", "hospital-a", refused={1: [epochs]}
    )
    deployed_copy(
        finished_run, federation / "runs" / "newer", "hospital-c",
        refused={1: [epochs, epochs], 2: [dp_off]},
    )  # fmt: skip
    started = (older / "config.json").stat().st_mtime - 60  # the order runs are listed in
    os.utime(older / "config.json", (started, started))

    def released(owner: str) -> list[str]:
        """The row the ledger of `owner` implies: budget, spent, remaining, bar, delta."""
        spent = owners[owner]
        return [f"{spent.budget_epsilon:.3f}", f"{spent.spent_epsilon:.4f}",
                f"{spent.remaining:.4f}", "", f"{spent.delta:g}"]  # fmt: skip

    page = fetch(federation, "/runs/newer/privacy")
    assert table_rows(page, "released") == [
        ["hospital-a", *released("client-0"), "2"],
        ["hospital-b", *released("client-1"), "2"],
        ["hospital-c", "not released", "2"],
    ]
    assert "no ledgers (*.sqlite)" in page  # and nothing of a node's ledger is claimed
    progress = json.loads(fetch(federation, "/api/runs/newer/progress"))
    assert sorted(progress["epsilon"]) == list(NODES)  # the run page names nodes too
    with serving(federation) as url:
        open_page(browser, f"{url}runs/newer/privacy", "#released tbody tr", 3)
        withheld = browser.find_elements(By.CSS_SELECTOR, "#released tr.not-released td")  # type: ignore[attr-defined]
        assert [cell.text for cell in withheld] == ["hospital-c", "not released", "2"]
        save_screenshot(browser, "console-privacy-deployed")
    page = fetch(federation, "/federation")
    assert table_rows(page, "released") == [
        ["hospital-a", *released("client-0"), "newer", "2"],
        ["hospital-b", *released("client-1"), "newer", "2"],
        ["hospital-c", *released("client-2"), "older", "2"],  # withheld in the newer run
        [REVOKED, "no deployed run under runs/ yet", "-", "-"],
    ]
    # the rounds nodes refused over both runs, by node and reason, most frequent first
    assert table_rows(page, "node-refusals") == [
        ["hospital-b", epochs, "3", "older newer"],
        ["hospital-c", dp_off, "1", "newer"],
    ]


def test_the_federation_page_counts_refused_connections_by_reason_and_names_the_node(
    federation: Path,
) -> None:
    """The SuperLink's log is scanned into the audit log, then shown counted by reason;
    with no SuperLink answering, each node's status is the registry's, and the page says
    why the live status is missing."""
    page = fetch(federation, "/federation")
    assert dict(table_rows(page, "refusals")) == {
        "unknown or revoked node key (ApiError 2004)": "3",
        "TLS handshake failed (client did not speak TLS: plaintext node)": "2",
        "node presented no authentication key (ApiError 2001)": "1",
    }
    [refused] = [row[2] for row in table_rows(page, "events") if "2004" in row[2]]
    assert f"node={REVOKED} node_status=revoked" in refused and "count=3" in refused
    assert 'id="log-verdict" class="verified"' in page
    statuses = {row[0]: row[2] for row in table_rows(page, "nodes")}
    assert statuses == {**dict.fromkeys(NODES, "enrolled"), REVOKED: "revoked"}
    assert (
        "Live status unavailable: flwr supernode list failed: the SuperLink is not running; "
        f"start it with 'fedmodel server start --dir {federation}'"
    ) in html.unescape(page)


def test_an_offline_node_shows_when_flower_last_saw_it() -> None:
    """Flower's status of a node (as `list_nodes` joins it to the registry), worded."""
    seen = {"online_at": "2026-11-30T05:00:00Z", "offline_at": "2026-11-30T05:10:00Z"}
    assert _with_last_seen({"status": "offline", **seen})["last_seen"] == seen["offline_at"]
    assert _with_last_seen({"status": "online", **seen, "offline_at": None})["last_seen"] == (
        "now (online since 2026-11-30T05:00:00Z)"
    )
    never = {"status": "registered", "online_at": None, "offline_at": None}
    assert _with_last_seen(never)["last_seen"] == "never"


def test_the_privacy_page_lists_empirical_canary_audits_and_highlights_a_failed_one(
    tmp_path: Path,
) -> None:
    """Each `fedmodel audit empirical --json` saved in the run directory is a row; one
    whose lower bound exceeds the epsilon it tested, or a file that is no such JSON, is
    highlighted."""
    run_dir = tmp_path / "audited"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(RunConfig().to_run_config()))
    bound = one_run_epsilon_lower_bound(1000, 100, 90, 1e-5)  # 90 of 100 guesses right
    measured = EmpiricalAudit(
        canaries=1000, included=500, guesses=100, correct=90, beta=0.05, delta=1e-5,
        epsilon_lower_bound=bound, ceiling=one_run_epsilon_lower_bound(1000, 100, 100, 1e-5),
        dp=True, accountant_epsilon=2.0, pld_epsilon=1.8, noise_multiplier=1.0,
        sample_rate=0.01, steps=100,
    )  # fmt: skip
    claimed = replace(measured, claimed_epsilon=1.0)  # under-reported: the attack proves more
    for name, result in (("accountant", measured), ("claim", claimed)):
        (run_dir / f"empirical-audit-{name}.json").write_text(
            json.dumps(result.to_json(), indent=2)  # as the command prints it
        )
    (run_dir / "empirical-audit-notes.json").write_text('{"note": "not an audit"}')
    page = fetch(tmp_path, "/runs/audited/privacy")
    assert 1.0 < bound < 2.0
    shown = f"{bound:.3f}"
    assert table_rows(page, "empirical") == [
        ["empirical-audit-accountant.json", shown, "2.000", "-", "1000", "100", "90", "ok"],
        ["empirical-audit-claim.json", shown, "2.000", "1.000", "1000", "100", "90",
         "FAILED: the lower bound exceeds the epsilon tested"],
        ["empirical-audit-notes.json", "not `fedmodel audit empirical --json`"],
    ]  # fmt: skip
    highlighted = re.findall(r'<tr class="failed">\s*<td>([^<]+)</td>', page)
    assert highlighted == ["empirical-audit-claim.json", "empirical-audit-notes.json"]


def listening_addresses(port: int) -> list[str]:
    """The local addresses of every socket listening on `port`, from /proc/net/tcp{,6}."""
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
                found.append(".".join(str(b) for b in words[0]) if table == "tcp" else raw.hex())
    return found


def test_the_console_listens_on_127_0_0_1_only_by_default(console_url: str) -> None:
    port = int(console_url.rstrip("/").rsplit(":", 1)[1])
    assert console_url.startswith("http://127.0.0.1:")
    assert listening_addresses(port) == ["127.0.0.1"]
    rebound = urllib.request.Request(console_url, headers={"Host": f"rebound.example:{port}"})
    with pytest.raises(urllib.error.HTTPError) as refused:  # DNS rebinding: another Host
        urllib.request.urlopen(rebound)
    assert refused.value.code == 400
    with urllib.request.urlopen(console_url.replace("127.0.0.1", "localhost")) as reply:
        assert reply.status == 200


def test_a_token_guards_every_request_and_a_read_only_console_refuses_actions(
    tmp_path: Path,
) -> None:
    """Also: a run whose summary.json no FedModel wrote is one line, not a broken page."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text('{"scenario": "medical"}')

    def status(url: str, **headers: str) -> tuple[int, str]:
        request = urllib.request.Request(url, headers=headers, method="GET")
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, response.headers.get("set-cookie", "")
        except urllib.error.HTTPError as error:
            return error.code, ""

    with serving(tmp_path, "--bind", "127.0.0.1", "--token", TOKEN) as url:
        for path in ("", "compare", "static/console.js", "api/runs/nothing/progress"):
            assert status(url + path)[0] == 401, path
        assert status(url + "?token=wrong")[0] == 401
        assert status(url, Authorization="Bearer wrong")[0] == 401
        code, cookie = status(f"{url}?token={TOKEN}")
        assert code == 200 and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert status(url + "compare", Cookie=cookie.split(";")[0])[0] == 200
        assert status(url + "compare", Authorization=f"Bearer {TOKEN}")[0] == 200
        revoke = urllib.request.Request(
            f"{url}federation/nodes/site-a/revoke", data=b"confirm=site-a", method="POST",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(revoke)
        assert refused.value.code == 403
        assert "--allow-actions" in refused.value.read().decode()
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        with urllib.request.urlopen(urllib.request.Request(url, headers=bearer)) as listed:
            assert "summary.json: missing key 'dataset'" in html.unescape(listed.read().decode())
        with pytest.raises(urllib.error.HTTPError) as broken:
            urllib.request.urlopen(urllib.request.Request(f"{url}runs/broken", headers=bearer))
        assert broken.value.read().decode().endswith("summary.json: missing key 'dataset'")


def test_another_address_or_actions_without_a_token_is_a_one_line_error(
    runs_root: Path,
) -> None:
    result = subprocess.run(
        [*FEDMODEL, "console", str(runs_root), "--bind", "0.0.0.0"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: --bind 0.0.0.0 needs a token as well")
    assert result.stderr.count("\n") == 1
    with pytest.raises(ConfigError, match="--allow-actions needs a token"):
        console_command(runs_root, allow_actions=True)


def test_a_console_with_actions_stops_only_a_started_deployed_run(tmp_path: Path) -> None:
    """Each run it cannot stop is refused in one line that says why (the live stop is
    tests/shared_federation/test_console_actions.py's). The console is opened on the
    federation directory: its runs/ are listed there."""
    federation = tmp_path / "fed"
    made = subprocess.run(
        [*FEDMODEL, "server", "init", "--dir", str(federation), "--address", "127.0.0.1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    runs = federation / "runs"  # where `fedmodel run` writes; listed by a console on FED/
    configs = {
        "simulated": RunConfig(),
        "deployed": RunConfig(
            scenario="deployment", dataset="local", federation_dir=str(federation)
        ),
        "elsewhere": RunConfig(scenario="deployment", dataset="local", federation_dir=str(runs)),
    }
    for name, config in configs.items():
        (runs / name / "engine").mkdir(parents=True)
        (runs / name / "config.json").write_text(
            json.dumps(config.relative_to(runs / name).to_run_config())
        )
    started = runs / "started"
    shutil.copytree(runs / "deployed", started)
    (started / "engine" / "flwr-run.log").write_text("🎊 Successfully started run 4242\n")

    def stop(url: str, name: str, **headers: str) -> tuple[int, str]:
        request = urllib.request.Request(
            f"{url}api/runs/{name}/stop", method="POST", headers=headers
        )
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    with serving(federation, "--allow-actions", "--token", TOKEN) as url:
        assert stop(url, "started")[0] == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        refusals = {name: stop(url, name, **bearer) for name in [*configs, "started", "nothing"]}
        buttons = {}
        for name in ("simulated", "started"):
            with urllib.request.urlopen(
                urllib.request.Request(url + f"runs/{name}", headers=bearer)
            ) as page:
                buttons[name] = 'id="stop"' in page.read().decode()
    assert buttons == {"simulated": False, "started": True}  # a deployed run's page only
    assert refusals["simulated"] == (
        409, "run 'simulated' is a simulation (medical): stop it with Ctrl-C where it runs"
    )  # fmt: skip
    assert refusals["deployed"] == (
        409, f"{runs / 'deployed' / 'engine' / 'flwr-run.log'} shows no run started on the "
        "SuperLink (yet); nothing to stop",
    )  # fmt: skip
    assert refusals["elsewhere"][0] == 409
    assert refusals["elsewhere"][1].endswith(
        f"federation_dir ({runs}) is not a federation directory; stop the run with Ctrl-C on "
        "its 'fedmodel run'"
    )
    assert refusals["started"] == (
        409, f"no SuperLink is answering for {federation} to stop 'started'; check it with "
        f"'fedmodel server status --dir {federation}'",
    )  # fmt: skip
    assert refusals["nothing"] == (404, f"no run named 'nothing' under {federation}")
