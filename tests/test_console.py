"""`fedmodel console` in a real browser, over a real simulation it watches while it runs.

One console process serves the module's runs directory; one 2-round simulation of three
hospitals runs into it. The run page is opened while the simulation trains, and must
show its results without a reload; every number checked on a page is the one the run's
own files (or `fedmodel audit`'s library function) give.
"""

from __future__ import annotations

import html
import json
import shutil
import sqlite3
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fedmodel.cli.console import console_command
from fedmodel.config.run_config import RunConfig
from fedmodel.errors import ConfigError
from fedmodel.privacy.audit import audit
from tests.browser import save_screenshot
from tests.console import FEDMODEL, serving, table_rows

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


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def series(browser: object, chart: str) -> dict[str, list[float]]:
    """Each dataset of a Chart.js chart on the page: label -> y values."""
    found = browser.execute_script(  # type: ignore[attr-defined]
        f"return Chart.getChart('{chart}').data.datasets.map(d => [d.label, d.data.map(p => p.y)])"
    )
    return dict(found)


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
    browser.get(f"{console_url}runs/{RUN}/privacy")  # type: ignore[attr-defined]
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

    browser.get(f"{console_url}runs/tampered/privacy")  # type: ignore[attr-defined]
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
