"""Run one simulated federation on Flower's Simulation Engine (Ray), end to end.

We start our own local SuperLink (simulation mode, 127.0.0.1, a free port) from a
neutral directory inside the run directory, so Ray's actors import FedModel from the
installed package and never from whatever directory the user is in. The Flower App
handed to `flwr run` is a generated pyproject.toml naming our ServerApp and ClientApp
with the resolved run config; the code itself comes from the installed package, so
this works the same from a checkout and from a wheel. Every process we start carries a
private token in its environment; on exit we stop exactly those, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError, SimulationError
from fedmodel.runtime.processes import executable, free_port, tool_environment
from server.run_record import PROGRESS_MARKER

RUN_TOKEN_VARIABLE = "FEDMODEL_RUN_TOKEN"
SUPERLINK_START_TIMEOUT_S = 60.0

ENGINE_ENVIRONMENT = {  # on top of fedmodel.runtime.processes.tool_environment
    # Ray binds its services to the node IP; this makes that 127.0.0.1 on Linux.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "GRPC_VERBOSITY": "ERROR",
}

ProgressCallback = Callable[[dict[str, Any]], None]
ENGINES = ("local", "ray")


def progress_line(row: dict[str, Any], measures: str, elapsed_s: float) -> str:
    """One completed round as the CLIs print it: round, `measures`, max epsilon, time."""
    epsilon = "" if row["max_epsilon"] is None else f"  max epsilon {row['max_epsilon']:.3f}"
    return f"round {row['round']}/{row['rounds']}  {measures}{epsilon}  ({elapsed_s:.0f} s)"


EngineRun = Callable[[RunConfig, ProgressCallback, Callable[[str], None] | None], dict[str, Any]]


def run_federation(
    config: RunConfig,
    run_dir: Path,
    on_progress: ProgressCallback,
    on_log_line: Callable[[str], None] | None = None,
    engine: str = "local",
) -> dict[str, Any]:
    """Run the federation described by `config`; return the run's summary.json content.

    `on_progress` receives one dict per completed round; `on_log_line`, when given,
    receives every raw engine log line (the CLI's --verbose). `engine` is `local`
    (simulations/local_engine.py: this machine, warm worker pool) or `ray` (Flower's
    Simulation Engine, which also runs on a Ray cluster).
    """
    with started_engine(config, run_dir, engine, config.clients_per_round) as run:
        return run(config, on_progress, on_log_line)


@contextmanager
def started_engine(
    config: RunConfig, run_dir: Path, engine: str, clients_per_round: int | None
) -> Iterator[EngineRun]:
    """Start `engine` for `config` now; yield the function that runs the federation on it.

    The local engine's workers begin importing torch and Opacus at once (seconds of CPU),
    so whatever the caller does inside the block - loading and summarising the data -
    overlaps them; the yielded function may then be given the same config with `clients`
    resolved (`clients_per_round`: None while the data has yet to say; it caps the
    workers). Leaving the block stops every worker. When the block fails before the run
    started, a run directory this made is removed again: a user's mistake leaves nothing.
    """
    run_dir = run_dir.absolute()  # Flower's processes run in engine_dir, not in our cwd
    made = run_dir  # the outermost directory this makes (runs/ on a first run)
    while not made.parent.exists():
        made = made.parent
    created = not run_dir.exists()
    engine_dir = run_dir / "engine"
    engine_dir.mkdir(parents=True, exist_ok=True)
    environment = engine_environment(engine_dir)
    pool = None
    if engine == "local":
        from simulations.local_engine import WorkerPool, worker_count
        from simulations.local_worker import CLIENT_APP_VARIABLE

        environment[CLIENT_APP_VARIABLE] = client_app_reference(config)
        pool = WorkerPool(worker_count(clients_per_round), engine_dir / "workers.log", environment)
    started = False

    def run(
        config: RunConfig,
        on_progress: ProgressCallback,
        on_log_line: Callable[[str], None] | None,
    ) -> dict[str, Any]:
        nonlocal started
        started = True
        # Owners' ledgers key a run's spending by its run-uid: every run needs its own (the
        # local engine's Flower run id is the same for every run, so it cannot stand in).
        config = config.replace(output_dir=str(run_dir), run_uid=config.run_uid or uuid.uuid4().hex)
        if pool is not None:
            from simulations.local_engine import run_local

            run_local(config, pool, engine_dir, on_progress, on_log_line)
        else:
            _run_on_ray(config, engine_dir, environment, on_progress, on_log_line)
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        if summary is None or not summary.get("completed"):
            raise SimulationError(
                f"the simulation did not complete; engine logs are in {engine_dir} "
                "(rerun with --verbose to see them live)"
            )
        return dict(summary)

    try:
        yield run
    finally:
        if pool is not None:
            pool.close()
        if created and not started:
            shutil.rmtree(made, ignore_errors=True)


def federation_config(config: RunConfig) -> str:
    """Ray engine resources: one CPU per client (Flower's default of 2 halves the
    parallelism) and, with --gpus-per-client, that share of a GPU."""
    federation = f"num-supernodes={config.clients} client-resources-num-cpus=1"
    if config.gpus_per_client > 0:
        federation += f" client-resources-num-gpus={config.gpus_per_client}"
    return federation


def check_device(config: RunConfig) -> None:
    """Fail before any engine starts when the run asks for a GPU this machine lacks
    (Ray would otherwise wait forever for GPU resources)."""
    from fedmodel.training import select_device

    device = select_device(config.device)
    if config.gpus_per_client > 0 and device.type != "cuda":
        raise ConfigError(
            f"--gpus-per-client {config.gpus_per_client:g} needs a CUDA device, but clients "
            f"would train on the CPU here (--device {config.device}); drop --gpus-per-client"
        )


def write_flower_app(
    app_dir: Path,
    config: RunConfig,
    name: str = "simulation",
    server_app: str = "server.app:app",
    client_app: str = "client.app:app",
) -> None:
    """A Flower App definition whose components are installed apps ("module:attribute").

    `name` (letters, digits, hyphens) tells simulation and deployment runs apart in
    Flower's run list: the app is `fedmodel/fedmodel-<name>`. The components default to
    the deployed apps; a simulation passes its own (`SIMULATION_SERVER_APP`).
    """
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "fedmodel-{name}"',
        'version = "1.0.0"',
        f'description = "FedModel {name} run"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedmodel"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{server_app}"',
        f'clientapp = "{client_app}"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in config.to_run_config().items()]
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")


SIMULATION_SERVER_APP = "simulations.apps:server_app"


def client_app_reference(config: RunConfig) -> str:
    """The simulation's ClientApp for `config`: SecAgg+ needs Flower's legacy client."""
    return "simulations.apps:" + ("secagg_client_app" if config.secagg else "client_app")


def _toml_value(value: int | float | bool | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def engine_environment(engine_dir: Path) -> dict[str, str]:
    """What every engine process gets: our tools first, a private FLWR_HOME, loopback Ray,
    and the run token by which we find and stop exactly what we started."""
    environment = {**tool_environment(engine_dir / "flwr-home"), **ENGINE_ENVIRONMENT}
    environment[RUN_TOKEN_VARIABLE] = uuid.uuid4().hex
    (engine_dir / "flwr-home").mkdir(exist_ok=True)
    return environment


@contextmanager
def local_superlink(engine_dir: Path, environment: dict[str, str]) -> Iterator[int]:
    """A simulation SuperLink on 127.0.0.1, stopped with all its descendants on exit."""
    port = free_port()
    log_path = engine_dir / "superlink.log"
    command = [
        executable("flower-superlink"),
        "--insecure",  # loopback-only simulation control plane; no Fleet API is opened
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        ":flwr-in-memory:",
        "--disable-runtime-dependency-installation",
    ]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command,
            cwd=engine_dir,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_healthy(process, port, log_path)
        yield port
    finally:
        stop_processes(environment[RUN_TOKEN_VARIABLE], process)


def _wait_until_healthy(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + SUPERLINK_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(f"the local SuperLink exited at start; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SimulationError(f"the local SuperLink did not answer within 60 s; see {log_path}")


def _run_on_ray(
    config: RunConfig,
    engine_dir: Path,
    environment: dict[str, str],
    on_progress: ProgressCallback,
    on_log_line: Callable[[str], None] | None,
) -> None:
    """`flwr run` of a generated App on a simulation SuperLink of ours."""
    app_dir = engine_dir / "app"
    app_dir.mkdir(exist_ok=True)
    write_flower_app(app_dir, config, server_app=SIMULATION_SERVER_APP,
                     client_app=client_app_reference(config))  # fmt: skip
    with local_superlink(engine_dir, environment) as port:
        environment["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(port)
        command = flwr_run_command(app_dir, federation_config(config))
        stream_run_output(command, engine_dir, environment, on_progress, on_log_line)


def flwr_run_command(app_dir: Path, federation: str, *options: str) -> list[str]:
    """`flwr run` of the App in `app_dir` on our local SuperLink, logs streamed."""
    return [
        executable("flwr"),
        "run",
        str(app_dir),
        "local",
        "--stream",
        "--federation-config",
        federation,
        *options,
    ]


def stream_run_output(
    command: list[str],
    engine_dir: Path,
    environment: dict[str, str],
    on_progress: ProgressCallback,
    on_log_line: Callable[[str], None] | None,
) -> int:
    """Run a `flwr run --stream` command; log it to engine_dir/flwr-run.log; parse progress.

    Returns the command's exit code. Shared by simulation and deployment runs.
    """
    with (engine_dir / "flwr-run.log").open("w") as log_file:
        process = subprocess.Popen(
            command,
            cwd=engine_dir,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert process.stdout is not None
        try:
            for line in process.stdout:
                log_file.write(line)
                log_file.flush()
                if on_log_line is not None:
                    on_log_line(line.rstrip("\n"))
                if PROGRESS_MARKER in line:
                    payload = line.split(PROGRESS_MARKER, 1)[1]
                    on_progress(json.loads(payload))
            process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return int(process.returncode)


def stop_processes(token: str, leader: subprocess.Popen[bytes]) -> None:
    """Stop every process whose environment carries `token`, the SuperLink's tree first."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGTERM)
    try:
        leader.wait(timeout=10)
    except subprocess.TimeoutExpired:
        leader.kill()
        leader.wait()
    deadline = time.monotonic() + 10
    while (remaining := processes_with_token(token)) and time.monotonic() < deadline:
        for pid in remaining:
            _signal(pid, signal.SIGTERM if time.monotonic() < deadline - 5 else signal.SIGKILL)
        time.sleep(0.2)
    for pid in processes_with_token(token):
        _signal(pid, signal.SIGKILL)


def processes_with_token(token: str) -> list[int]:
    """PIDs of live processes started for this run (found by the token in their environ)."""
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


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
