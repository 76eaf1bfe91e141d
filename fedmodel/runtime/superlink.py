"""When a SuperLink we started serves: the deployed one's and the simulation's wait.

A SuperLink is up once its Control API answers `/health`; until then a slow start and
a broken one look alike, so we wait for that answer or for the process to exit.
"""

from __future__ import annotations

import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from fedmodel.errors import FedModelError

START_TIMEOUT_S = 60.0


def answers_health(url: str, context: ssl.SSLContext | None = None) -> bool:
    """Whether `url` (a SuperLink's `/health`) answers within a second."""
    try:
        with urllib.request.urlopen(url, timeout=1, context=context):
            return True
    except (OSError, ssl.SSLError):
        return False


def wait_until_healthy(
    process: subprocess.Popen[bytes],
    health_url: str,
    log_path: Path,
    error: type[FedModelError],
    context: ssl.SSLContext | None = None,
) -> None:
    """Return once `health_url` answers; raise `error`, naming the log's last line, if
    `process` (a SuperLink logging to `log_path`) exits first or stays silent for
    START_TIMEOUT_S. Stopping it then is the caller's: it knows how it was started."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers_health(health_url, context):
        if process.poll() is not None:
            raise error(
                f"the SuperLink exited at start (code {process.returncode}): {_last_line(log_path)}"
            )
        if time.monotonic() > deadline:
            raise error(
                f"the SuperLink did not answer within {START_TIMEOUT_S:.0f} s; see {log_path}"
            )
        time.sleep(0.2)


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"no output; see {path}"
