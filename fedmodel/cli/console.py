"""`fedmodel console PATH`: the operator's and auditor's console in a browser."""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedmodel.errors import ConfigError

console = Console(highlight=False, emoji=False)

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_VARIABLE = "FEDMODEL_CONSOLE_TOKEN"


def console_command(
    path: Annotated[
        Path,
        typer.Argument(help="A directory of runs, one run directory, or a federation directory."),
    ],
    port: Annotated[int, typer.Option(help="Port to serve on (0: any free port).")] = DEFAULT_PORT,
    bind: Annotated[
        str | None,
        typer.Option(
            help="Serve on this address instead of 127.0.0.1; needs --token. With a "
            "federation directory the console then serves TLS with the federation's "
            "certificate (the one nodes already trust through its CA)."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar=TOKEN_VARIABLE,
            help="Secret every request must carry (open the console with ?token=...). "
            f"Prefer ${TOKEN_VARIABLE}: a command line is visible to other local accounts.",
        ),
    ] = None,
    allow_actions: Annotated[
        bool,
        typer.Option(
            "--allow-actions",
            help="Allow revoking nodes and stopping deployed runs from the console "
            "(needs --token).",
        ),
    ] = False,
) -> None:
    """Serve the console: runs (live progress, charts, baselines), privacy budgets and
    audits per data owner, the federation's nodes and audit log. Read-only by default."""
    import uvicorn

    from fedmodel.console.app import create_app
    from fedmodel.console.federation import is_federation_directory

    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; give a run, runs or federation directory")
    if bind is not None and not token:
        raise ConfigError(
            f"--bind {bind} needs a token as well (--token or ${TOKEN_VARIABLE}), which "
            "every request must then carry"
        )
    if allow_actions and not token:
        raise ConfigError(f"--allow-actions needs a token (--token or ${TOKEN_VARIABLE})")
    if not 0 <= port < 65536:
        raise ConfigError(f"--port must be between 0 and 65535 (got {port})")
    address = bind or LOOPBACK
    tls = bind is not None and is_federation_directory(path)
    certificate, key = _federation_certificate(path) if tls else (None, None)
    listener = _listen(address, port)
    host = f"[{address}]" if ":" in address else address
    url = f"{'https' if tls else 'http'}://{host}:{listener.getsockname()[1]}/"
    console.print(f"FedModel console on {url}" + (" (open it with ?token=TOKEN)" if token else ""))
    if not tls and not _is_loopback(address):
        console.print(
            "[yellow]warning:[/yellow] plain HTTP beyond this machine: the token travels "
            "unencrypted (only a federation directory has a certificate)"
        )
    config = uvicorn.Config(
        create_app(path, token, allow_actions),
        log_level="warning",
        ssl_certfile=certificate,
        ssl_keyfile=key,
    )
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: uvicorn shut down cleanly, then re-raised it
        console.print("Console stopped.")


def _is_loopback(bind: str) -> bool:
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind == "localhost"


def _listen(bind: str, port: int) -> socket.socket:
    """A listening socket on exactly (bind, port): the console never widens the address."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((bind, port))
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {bind} is in use; choose another --port (0: any free port)"
            ) from None
        raise ConfigError(f"cannot listen on {bind}:{port} ({error.strerror})") from None
    listener.listen(128)
    return listener


def _federation_certificate(directory: Path) -> tuple[str, str]:
    """The SuperLink's certificate and key, which nodes already trust through the CA."""
    from fedmodel.pki import server_pki_paths
    from server.superlink import ServerError

    paths = server_pki_paths(directory.absolute())
    for path in (paths.server_certificate, paths.server_key):
        if not path.is_file():
            raise ServerError(
                f"{path} is missing, so the console cannot serve TLS; renew it with "
                f"'fedmodel server renew-cert --dir {directory}'"
            )
    return str(paths.server_certificate), str(paths.server_key)
