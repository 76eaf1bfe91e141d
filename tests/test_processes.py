"""Following a child's log: a process that says it is exiting but hangs is stopped."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fedmodel.processes import follow_log, group_alive

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
