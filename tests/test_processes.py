"""How `client start` follows its SuperNode: a hung exit is stopped, a refusal explained."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fedmodel.runtime.processes import follow_log, group_alive

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
