"""Run one simulated federation on Flower's Simulation Engine (Ray), end to end.

We start our own local SuperLink (simulation mode, 127.0.0.1, a free port) from a
neutral directory inside the run directory, so Ray's actors import FedModel from the
installed package and never from whatever directory the user is in. The App handed to
`flwr run` is fedmodel.runtime.flower_app's. Every process we start carries a private
token in its environment; on exit we stop exactly those, and nothing else.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError, SimulationError
from fedmodel.run_directory import ENGINE_DIR, RunSummary
from fedmodel.runtime.flower_app import staged_flower_app
from fedmodel.runtime.flwr_run import ProgressCallback, flwr_run_command, stream_run_output
from fedmodel.runtime.processes import (
    RUN_TOKEN_VARIABLE,
    executable,
    free_port,
    start_detached,
    stop_group,
    tool_environment,
)
from fedmodel.runtime.superlink import wait_until_healthy

STOP_TIMEOUT_S = 10.0  # for the SuperLink's group, then again for Ray's daemons

ENGINE_ENVIRONMENT = {  # on top of fedmodel.runtime.processes.tool_environment
    # Ray binds its services to the node IP; this makes that 127.0.0.1 on Linux.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "GRPC_VERBOSITY": "ERROR",
}

ENGINES = ("local", "ray")


EngineRun = Callable[[RunConfig, ProgressCallback, Callable[[str], None] | None], RunSummary]


def run_federation(
    config: RunConfig,
    run_dir: Path,
    on_progress: ProgressCallback,
    on_log_line: Callable[[str], None] | None = None,
    engine: str = "local",
) -> RunSummary:
    """Run the federation described by `config`; return the run's summary.json.

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
    engine_dir = run_dir / ENGINE_DIR
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
    ) -> RunSummary:
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
        summary = RunSummary.of_completed_run(run_dir)
        if summary is None:
            raise SimulationError(
                f"the simulation did not complete; engine logs are in {engine_dir} "
                "(rerun with --verbose to see them live)"
            )
        return summary

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


SIMULATION_SERVER_APP = "simulations.apps:server_app"


def client_app_reference(config: RunConfig) -> str:
    """The simulation's ClientApp for `config`: SecAgg+ needs Flower's legacy client,
    distributed DP FedModel's own SecAgg+ mod."""
    if config.distributed_dp:
        return "simulations.apps:distributed_dp_client_app"
    return "simulations.apps:" + ("secagg_client_app" if config.secagg else "client_app")


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
    process = start_detached(command, log_path, environment, cwd=engine_dir)
    try:
        health_url = f"http://127.0.0.1:{port}/health"
        wait_until_healthy(process, health_url, log_path, SimulationError)
        yield port
    finally:
        stop_group(process.pid, STOP_TIMEOUT_S, environment[RUN_TOKEN_VARIABLE])


def _run_on_ray(
    config: RunConfig,
    engine_dir: Path,
    environment: dict[str, str],
    on_progress: ProgressCallback,
    on_log_line: Callable[[str], None] | None,
) -> None:
    """`flwr run` of a generated App on a simulation SuperLink of ours."""
    app = staged_flower_app(
        config, server_app=SIMULATION_SERVER_APP, client_app=client_app_reference(config)
    )
    with app as app_dir, local_superlink(engine_dir, environment) as port:
        environment["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(port)
        command = flwr_run_command(
            app_dir, "local", "--federation-config", federation_config(config)
        )
        stream_run_output(command, engine_dir, environment, on_progress, on_log_line)
