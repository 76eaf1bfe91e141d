"""The SuperNode a data owner starts: told its paths whatever they are spelled in, and
never outliving the `fedmodel client start` that owns it."""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from client.executor import IDLE_POLL_INTERVAL_S, POLL_INTERVAL_S
from client.supernode import SuperNodeError, node_config_toml
from fedmodel.runtime.polling import backoff_waits
from tests.federation import (
    background,
    federation_workspace,
    fedmodel,
    operator_ca_fingerprint,
    start_server,
    wait_for_text,
    wait_until_activated,
    wait_until_online,
    write_sites,
)

ODD_NAME = 'hôpital Zürich 😀 "quoted" back\\slash'  # non-ASCII, outside the BMP, TOML's specials


def test_node_config_reaches_flower_as_written_whatever_the_characters(tmp_path: Path) -> None:
    config: dict[str, str | float] = {
        "data-path": f"/data/{ODD_NAME}/données.csv", "label": "décès\ttab",
        "ledger-path": "/ledger/\x7f\x01.sqlite", "budget-epsilon": 1.5,
    }  # fmt: skip
    path = tmp_path / "node-config.toml"
    path.write_text(node_config_toml(config), encoding="utf-8")
    assert parse_config_args([str(path)]) == config  # Flower's own reader of --node-config


def test_a_path_that_is_not_utf8_is_refused_in_one_line() -> None:
    undecodable = os.fsdecode(b"/data/caf\xe9.csv")  # a Latin-1 file name
    with pytest.raises(SuperNodeError, match="not valid UTF-8") as caught:
        node_config_toml({"data-path": undecodable})
    assert "\n" not in str(caught.value)


def test_an_idle_node_polls_its_supernode_less_often_but_twice_a_second_at_least() -> None:
    """Each poll costs the SuperNode and the executor CPU (at 0.1 s, ~6% of a core per idle
    node); after a task the next one may follow soon, so waits restart short."""
    waits = backoff_waits(POLL_INTERVAL_S, IDLE_POLL_INTERVAL_S)
    assert list(itertools.islice(waits, 6)) == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: it is only waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_killed_client_start_takes_its_supernode_and_executor_with_it(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer) gives `client start` no chance to stop its children: the
    kernel's parent-death signal must. The node lives under a non-ASCII path, so this also
    shows such a SuperNode reads its node config and comes online."""
    with federation_workspace(tmp_path) as space:
        server = tmp_path / "srv"
        start_server(server)
        node = tmp_path / ODD_NAME
        data = write_sites(tmp_path, [ODD_NAME])[ODD_NAME]
        assert fedmodel("client", "init", "--dir", node, "--budget-epsilon", "1").returncode == 0
        enrolled = fedmodel(
            "server", "enroll", node / "node.pub", "--name", "site", "--dir", server
        )
        assert enrolled.returncode == 0, enrolled.stderr
        client = background(
            "client", "start", "--dir", node, "--join", server / "bundles" / "site.join",
            "--data", data, "--label", "death", "--device", "cpu",
            "--ca-fingerprint", operator_ca_fingerprint(server),
            log=tmp_path / "client.out",
        )  # fmt: skip
        space.started.append(client)
        wait_for_text(node / "executor.log", "node executor serving", client, 120)
        wait_until_activated(node, client)  # then one listing confirms it
        wait_until_online(server, 1)
        children = [int((node / f"{role}.pid").read_text()) for role in ("supernode", "executor")]
        assert all(map(_alive, children))

        client.send_signal(signal.SIGKILL)
        client.wait()
        deadline = time.monotonic() + 60
        while any(map(_alive, children)):
            assert time.monotonic() < deadline, f"orphans still running: {children}"
            time.sleep(0.1)
        # The key is offline now: Flower's SuperLink says so at once if the SuperNode's
        # graceful exit reached it, else after the missed heartbeats (about a minute).
