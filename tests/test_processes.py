"""Processes we start: detached with a log, found by PID file or run token, stopped as a
group; how `client start` follows its SuperNode (a hung exit is stopped, a refusal
explained)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmodel.errors import FedModelError
from fedmodel.runtime.processes import (
    RUN_TOKEN_VARIABLE,
    follow_log,
    free_port,
    group_alive,
    processes_with_token,
    recorded_process,
    start_detached,
    stop_group,
)
from fedmodel.runtime.superlink import wait_until_healthy

HANGS_AFTER_SAYING_GOODBYE = """
import sys, time
print("working", flush=True)
print("SuperNode terminated gracefully.", flush=True)
time.sleep(120)  # a shutdown retry loop that never ends
"""


def _start(script: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_a_process_that_logged_its_exit_and_hangs_is_stopped_after_the_grace(
    tmp_path: Path,
) -> None:
    log = tmp_path / "node.log"
    process = _start(HANGS_AFTER_SAYING_GOODBYE, log)
    lines: list[str] = []
    started = time.monotonic()
    try:
        follow_log(log, process, lines.append, 0, ("terminated gracefully",), 1.0)
    finally:
        if process.poll() is None:
            process.kill()
    assert time.monotonic() - started < 60  # the script alone would run for 120 s
    assert process.poll() is not None and not group_alive(process.pid)
    assert lines == ["working", "SuperNode terminated gracefully."]


def test_without_an_exit_line_the_process_runs_to_its_own_end(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    process = _start("import time; print('working', flush=True); time.sleep(3)", log)
    started = time.monotonic()
    code = follow_log(log, process, lambda line: None, 0, ("terminated gracefully",), 0.5)
    assert code == 0 and time.monotonic() - started >= 2.5  # not cut short


def test_a_revoked_node_is_explained_by_its_exit_not_by_digits_in_a_message_id() -> None:
    """Refusal codes are matched as Flower prints them: a message ID that happens to
    contain 2001 once made a revoked node report 'requires an enrolled node key'."""
    from client.supernode import explain_exit

    log = (
        "INFO :      Receiving: train message (ID: 1fd76f2001ac62f081f297ccf5c887e9)\n"
        "INFO :      SuperNode terminated gracefully.\n"
        "WARNING :   Connection attempt failed, retrying in 1.49 seconds\n"
    )
    assert (
        explain_exit(log)
        == "the federation disconnected this node (revoked, or the server stopped)"
    )
    refused = "ERROR :     [code: 2004] Failed to activate SuperNode.\n"
    assert "not enrolled, or was revoked" in explain_exit(refused)


def test_a_detached_process_gets_its_own_session_log_and_environment(tmp_path: Path) -> None:
    log = tmp_path / "tool.log"
    log.write_text("earlier start\n")
    script = "import os; print(os.getsid(0) == os.getpid(), os.environ['MARK'], flush=True)"
    process = start_detached(
        [sys.executable, "-c", script], log, {"MARK": "ours"}, cwd=tmp_path, die_with_parent=True
    )
    assert process.wait(timeout=30) == 0
    assert log.read_text() == "earlier start\nTrue ours\n"  # appended, never truncated


def test_a_pid_file_counts_only_while_it_names_the_right_program_for_the_directory(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "tool.pid"
    assert recorded_process(pid_file, "tool", tmp_path) is None  # no file yet
    command = [sys.executable, "-c", "import time; time.sleep(30)", "tool", str(tmp_path)]
    process = subprocess.Popen(command, start_new_session=True)
    try:
        pid_file.write_text(f"{process.pid}\n")
        deadline = time.monotonic() + 10  # the kernel shows an empty cmdline mid-exec
        while not Path(f"/proc/{process.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recorded_process(pid_file, "tool", tmp_path) == (process.pid, [*command, ""])
        assert recorded_process(pid_file, "flower-superlink", tmp_path) is None
        assert recorded_process(pid_file, "tool", tmp_path / "elsewhere") is None
    finally:
        stop_group(process.pid)
    assert recorded_process(pid_file, "tool", tmp_path) is None  # stale: the process is gone


def test_stopping_a_group_with_its_token_also_stops_what_left_the_group(tmp_path: Path) -> None:
    """Ray starts its daemons in sessions of their own; the run token still finds them."""
    token = "test-" + str(time.monotonic_ns())
    leaves_the_group = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " start_new_session=True)\n"
        "time.sleep(120)\n"
    )
    environment = {**os.environ, RUN_TOKEN_VARIABLE: token}
    leader = start_detached([sys.executable, "-c", leaves_the_group], tmp_path / "log", environment)
    deadline = time.monotonic() + 30
    while len(processes_with_token(token)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(processes_with_token(token)) == 2
    stop_group(leader.pid, timeout=5, token=token)
    assert processes_with_token(token) == [] and not group_alive(leader.pid)


def test_a_superlink_that_exits_at_start_is_reported_with_its_last_log_line(
    tmp_path: Path,
) -> None:
    log = tmp_path / "superlink.log"
    script = "print('starting'); print('Port 9093 is already in use'); raise SystemExit(3)"
    process = start_detached([sys.executable, "-c", script], log, dict(os.environ))
    with pytest.raises(FedModelError, match=r"exited at start \(code 3\): Port 9093 is already"):
        wait_until_healthy(process, f"http://127.0.0.1:{free_port()}/health", log, FedModelError)
