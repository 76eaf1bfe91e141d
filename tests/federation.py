"""Helpers for end-to-end tests of a real federation on 127.0.0.1, driven by the CLI.

Every process is started through the `fedmodel` CLI exactly as an operator and data
owners would; cleanup stops them by PID and, as a last resort, kills any process whose
command line names the test's own directory (nothing else).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

FEDMODEL = [sys.executable, "-m", "fedmodel.cli"]
ROWS_PER_SITE = 120


def fedmodel(
    *args: str | Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDMODEL, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def background(
    *args: str | Path, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[str]:
    with log.open("w") as handle:
        return subprocess.Popen(
            [*FEDMODEL, *map(str, args)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            # lines reach the log as printed
            env={**(env or os.environ), "PYTHONUNBUFFERED": "1"},
        )


def wait_for_text(
    path: Path, text: str, process: subprocess.Popen[str], timeout: float, count: int = 1
) -> None:
    """Until `text` appears `count` times in `path`, while `process` lives."""
    deadline = time.monotonic() + timeout
    while (path.read_text() if path.exists() else "").count(text) < count:
        if process.poll() is not None or time.monotonic() > deadline:
            found = path.read_text()[-3000:] if path.exists() else "(no file)"
            pytest.fail(f"'{text}' did not appear {count} time(s) in {path}:\n{found}")
        time.sleep(0.1)


def wait_until_online(server: Path, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while (listing := fedmodel("server", "nodes", "--dir", server).stdout).count("online") < count:
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {count} nodes came online:\n{listing}")
        time.sleep(1)


def processes_naming(directory: Path) -> list[int]:
    needle = str(directory).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


@dataclasses.dataclass
class Workspace:
    """A directory for one federation, and the CLI processes started in it."""

    path: Path
    started: list[subprocess.Popen[str]]


@contextlib.contextmanager
def federation_workspace(path: Path) -> Iterator[Workspace]:
    """Everything started in the workspace is stopped afterwards, even when a test fails."""
    space = Workspace(path, [])
    try:
        yield space
    finally:
        for process in space.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # the CLI stops its SuperNode on SIGTERM
        for process in space.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        if (path / "srv" / "federation.toml").exists():
            fedmodel("server", "stop", "--dir", path / "srv", timeout=60)
        for pid in processes_naming(path):  # last resort; only this test's processes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclasses.dataclass(frozen=True)
class Site:
    """A data owner who joins: its node's name and budget, and the copy of FedModel its
    node runs (None: this checkout)."""

    name: str
    budget_epsilon: float
    code: Path | None = None


@contextlib.contextmanager
def joined_federation(
    path: Path, sites: Sequence[Site], rows: int = ROWS_PER_SITE
) -> Iterator[tuple[Workspace, Path]]:
    """A started SuperLink in `path`/srv, every site joined with `rows` patients
    (`path`/NAME.csv) and online: (workspace, server directory)."""
    with federation_workspace(path) as space:
        start_server(path / "srv")
        data = write_sites(path, [site.name for site in sites], rows)
        started = {}
        for site in sites:
            env = None if site.code is None else {**os.environ, "PYTHONPATH": str(site.code)}
            started[site.name] = join_node(
                space, path / "srv", path / site.name, data[site.name], site.budget_epsilon, env
            )
        for name, node in started.items():
            wait_until_activated(path / name, node)
        wait_until_online(path / "srv", len(sites))
        yield space, path / "srv"


def copy_source_tree(code: Path) -> None:
    """FedModel's packages, copied to `code`: a node run with PYTHONPATH=code runs this
    copy, which a test may change (the owner approves what is there at `client init`)."""
    import shutil

    repository = Path(__file__).resolve().parents[1]
    for package in ("fedmodel", "client", "server", "simulations"):
        shutil.copytree(repository / package, code / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip


def start_server(server: Path, env: dict[str, str] | None = None) -> None:
    """`server init` on 127.0.0.1 with free ports, then `server start --detach` (in `env`:
    the SuperLink and the ServerApps it starts import what its PYTHONPATH holds)."""
    from fedmodel.runtime.processes import free_port

    ports = ("--fleet-port", free_port(), "--control-port", free_port())
    made = fedmodel("server", "init", "--dir", server, "--address", "127.0.0.1", *ports)
    assert made.returncode == 0, made.stderr
    started = fedmodel("server", "start", "--dir", server, "--detach", timeout=90, env=env)
    assert started.returncode == 0, started.stderr


def operator_ca_fingerprint(server: Path) -> str:
    """The CA fingerprint `server init` printed: what the operator reads out to owners."""
    from fedmodel.pki import certificate_fingerprint

    return certificate_fingerprint((server / "ca.crt").read_bytes())


def write_sites(directory: Path, names: list[str], rows: int = ROWS_PER_SITE) -> dict[str, Path]:
    """One CSV of `rows` flchain patients per site (shuffled: the file is sorted by outcome)."""
    from fedmodel.datasets.medical import load_flchain_frame

    frame = load_flchain_frame().sample(frac=1.0, random_state=0)
    paths = {}
    for number, name in enumerate(names):
        paths[name] = directory / f"{name}.csv"
        frame.iloc[number * rows : (number + 1) * rows].to_csv(paths[name], index=False)
    return paths


def join_node(
    space: Workspace,
    server: Path,
    node: Path,
    data: Path,
    budget_epsilon: float,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """A data owner joins as the README says: `client init`, the operator's `server
    enroll`, then `client start` (pinning the operator's CA) in the background (returned,
    and stopped with `space`).

    Commands run from `node`'s parent: `python -m` puts the working directory first on
    the path, so a node given PYTHONPATH (a changed copy of FedModel) runs, and its owner
    approves, that copy.
    """
    made = subprocess.run(
        [*FEDMODEL, "client", "init", "--dir", node, "--budget-epsilon", str(budget_epsilon)],
        capture_output=True, text=True, timeout=120, env=env, cwd=node.parent,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    made = fedmodel("server", "enroll", node / "node.pub", "--name", node.name, "--dir", server)
    assert made.returncode == 0, made.stderr
    started = background(
        "client", "start", "--dir", node, "--join", server / "bundles" / f"{node.name}.join",
        "--data", data, "--label", "death", "--device", "cpu",
        "--ca-fingerprint", operator_ca_fingerprint(server),
        log=node.parent / f"{node.name}.out", env=env, cwd=node.parent,
    )  # fmt: skip
    space.started.append(started)
    return started


def wait_until_activated(node: Path, started: subprocess.Popen[str]) -> None:
    """Until the SuperNode of `node` has its ID from the SuperLink: a read of its log,
    where a `server nodes` listing costs about 2 s of CPU (flwr's CLI)."""
    wait_for_text(node / "supernode.log", "SuperNode ID", started, 180)
