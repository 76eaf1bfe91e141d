"""Long-running Flower processes we start: find them, follow their logs, stop them.

Each SuperLink or SuperNode runs in its own session (process group), so stopping it
takes down what it spawned (SuperExec, ServerApp/ClientApp processes) and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedmodel.errors import FedModelError


def executable(name: str) -> str:
    """A console script of this interpreter's environment (Flower's tools live there)."""
    candidate = Path(sys.executable).parent / name
    if not candidate.exists():
        raise FedModelError(
            f"'{name}' is not installed beside {sys.executable}; reinstall fedmodel"
        )
    return str(candidate)


def tool_environment(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower's tools: no telemetry, no update checks, no installs."""
    environment = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONWARNINGS": "ignore",
    }
    # Flower's processes spawn each other by name: put this environment's scripts first.
    environment["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), environment.get("PATH", "")]
    )
    if flwr_home is not None:
        environment["FLWR_HOME"] = str(flwr_home)
    return environment


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in Flower's log lines


def plain_lines(text: str) -> list[str]:
    """The lines of a tool's log, without colour codes or surrounding blanks."""
    return [_ANSI.sub("", line).strip() for line in text.splitlines()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def follow_log(
    path: Path,
    process: subprocess.Popen[bytes],
    on_line: Callable[[str], None],
    offset: int | None = None,
    exit_markers: tuple[str, ...] = (),
    exit_grace_s: float = 20.0,
) -> int:
    """Give `on_line` each line of `path` from `offset` (default: the end) until `process`
    exits; return its exit code.

    Once a line holds one of `exit_markers` (the process said it is exiting), it gets
    `exit_grace_s` seconds to do so before its process group is stopped: Flower's
    SuperNode can log its graceful exit and then hang in a shutdown retry loop.
    """
    exit_deadline: float | None = None
    with path.open("r", errors="replace") as log:
        log.seek(0, os.SEEK_END if offset is None else os.SEEK_SET)
        if offset is not None:
            log.seek(offset)
        while True:
            line = log.readline()
            if line:
                on_line(line.rstrip("\n"))
                if exit_deadline is None and any(marker in line for marker in exit_markers):
                    exit_deadline = time.monotonic() + exit_grace_s
                continue
            if process.poll() is not None:
                for rest in log:
                    on_line(rest.rstrip("\n"))
                return int(process.returncode)
            if exit_deadline is not None and time.monotonic() > exit_deadline:
                stop_group(process.pid)
                process.wait()
                continue
            time.sleep(0.2)


def stop_group(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM process group `pid` (a session leader we started), SIGKILL what remains."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        os.killpg(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once resumed
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and group_alive(pid):
        _reap(pid)
        time.sleep(0.2)
    if group_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        time.sleep(0.2)
    _reap(pid)


def group_alive(pgid: int) -> bool:
    """Whether process group `pgid` has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
