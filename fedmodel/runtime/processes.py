"""Long-running processes we start: start them, find them, follow their logs, stop them.

Each SuperLink, SuperNode or worker pool runs in its own session (process group), so
stopping it takes down what it spawned (SuperExec, ServerApp/ClientApp processes) and
nothing else. What leaves the group (Ray starts its daemons in sessions of their own)
is found by a run token in its environment.
"""

from __future__ import annotations

import contextlib
import ctypes
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

RUN_TOKEN_VARIABLE = "FEDMODEL_RUN_TOKEN"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


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
    # They also run from directories of their own: a relative PYTHONPATH (where a user's
    # task module lives, as typed on the command line) must name the same directories there.
    if environment.get("PYTHONPATH"):
        entries = environment["PYTHONPATH"].split(os.pathsep)
        environment["PYTHONPATH"] = os.pathsep.join(str(Path(e).absolute()) for e in entries if e)
    if flwr_home is not None:
        environment["FLWR_HOME"] = str(flwr_home)
    return environment


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in Flower's log lines


def plain_lines(text: str) -> list[str]:
    """The lines of a tool's log, without colour codes or surrounding blanks."""
    return [_ANSI.sub("", line).strip() for line in text.splitlines()]


def start_detached(
    command: list[str],
    log_path: Path,
    environment: dict[str, str],
    cwd: Path | None = None,
    pass_fds: tuple[int, ...] = (),
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `command` in a session of its own (away from the terminal's Ctrl-C, stopped as
    one group by `stop_group`), its output appended to `log_path`, no input.

    With `die_with_parent`, it also gets SIGTERM should this process die outright (Linux).
    """
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=pass_fds,
            preexec_fn=_parent_death_signal() if die_with_parent else None,
        )


def _parent_death_signal() -> Callable[[], None] | None:
    """Make the child get SIGTERM when this process dies, however it dies (Linux only).

    Elsewhere there is no such kernel feature and an orphan outlives a killed parent.
    libc is looked up here, before the fork; the child only makes the call. If this
    process died between fork and prctl, the child stops itself at once.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def recorded_process(pid_file: Path, program: str, directory: Path) -> tuple[int, list[str]] | None:
    """(pid, argv) of the process `pid_file` names, if it is alive and its command line
    names both `program` and `directory`: a stale PID file naming some other process
    never counts."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if program.encode() not in cmdline or str(directory.absolute()).encode() not in cmdline:
        return None
    return pid, cmdline.decode(errors="replace").split("\0")


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


def stop_group(pid: int, timeout: float = 15.0, token: str | None = None) -> None:
    """SIGTERM process group `pid` (a session leader we started), SIGKILL what remains
    after `timeout` seconds; then, given `token`, do the same to every process still
    carrying it in its environment (`processes_with_token`)."""
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
    if token is not None:
        _stop_tagged(token, timeout)


def _stop_tagged(token: str, timeout: float) -> None:
    """SIGTERM each process carrying `token` once, SIGKILL those left after `timeout` s."""
    terminated: set[int] = set()
    deadline = time.monotonic() + timeout
    while (remaining := processes_with_token(token)) and time.monotonic() < deadline:
        for pid in set(remaining) - terminated:
            _signal(pid, signal.SIGTERM)
            terminated.add(pid)
        time.sleep(0.2)
    for pid in processes_with_token(token):
        _signal(pid, signal.SIGKILL)


def processes_with_token(token: str) -> list[int]:
    """PIDs of live processes (not this one) whose environment sets RUN_TOKEN_VARIABLE
    to `token`: what we started for one run, and what that started in turn."""
    needle = f"{RUN_TOKEN_VARIABLE}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if status != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


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


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
