"""Rounds that survive a restart: checkpoint every round, resume from the last one.

Flower's `Strategy.start` always counts rounds from 1, keeps no state between runs and
has no checkpoint hook but `evaluate_fn` (called after round 0 and after every round).
`run_rounds` builds resume on that: after each round it writes the global model, the
strategy's state, the random generators' states and the run record (`latest.pt`); a
resumed run (run config `resume = true`) loads them and runs the remaining rounds, with
`ShiftedRounds` numbering them as the rounds they are, so the clients, metrics.csv,
summary.json and the checkpoints see rounds 3, 4 where Flower counts 1, 2. The privacy
ledgers need nothing here: clients key their spending by the run's `run-uid`, which a
resumed run keeps (client/app.py), so epsilon composes as if the run had never stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError
from fedmodel.run_directory import CHECKPOINTS_DIR, CONFIG_FILE, Scoring
from server.checkpoint import (
    ResumePoint,
    load_resume_point,
    restore_rng,
    restore_strategy_state,
    rng_state,
    save_checkpoint,
    strategy_state,
)
from server.run_record import RunRecorder
from server.strategy import FederationStopped, GuardedStrategy
from server.wrapping import WrappingStrategy

RoundEvaluation = Callable[[int, ArrayRecord], MetricRecord | None]


class RunPaused(FederationStopped):
    """The run stopped cleanly after `stop-after-round`; `--resume` continues it."""


class ShiftedRounds(WrappingStrategy):
    """Presents Flower's round k to `inner` as round `offset + k`.

    The shifted number is what FedAvg sends to clients as `server-round` (their training
    seed and ledger entries use it) and what FedAdam's bias correction uses.
    """

    def __init__(self, inner: Strategy, offset: int) -> None:
        super().__init__(inner)
        self.offset = offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)


def open_run_record(
    config: RunConfig, run_dir: Path, scoring: Scoring
) -> tuple[RunRecorder, ResumePoint | None]:
    """The run's recorder (scoring each model as `scoring` says), continuing the
    checkpointed record when `config.resume`."""
    if not config.resume:
        return RunRecorder(run_dir, config, scoring), None
    resume = load_resume_point(run_dir / CHECKPOINTS_DIR)
    if resume is None:
        raise RuntimeError(f"resume requested but {run_dir} holds no resumable checkpoint")
    return RunRecorder(run_dir, config, scoring, resume.record_state), resume


def run_rounds(
    grid: Grid,
    strategy: GuardedStrategy,
    recorder: RunRecorder,
    initial_arrays: ArrayRecord,
    resume: ResumePoint | None,
    evaluate_round: RoundEvaluation,
    **start_options: Any,
) -> None:
    """`strategy.start` for the rounds still to run, checkpointing after each.

    `evaluate_round(server_round, arrays)` is the caller's per-round evaluation (true
    round numbers). Raises RunPaused after `stop-after-round`, FederationStopped when
    too few clients can train.
    """
    config = recorder.config
    directory = recorder.run_dir / CHECKPOINTS_DIR
    offset = 0
    if resume is not None:
        offset = resume.completed_round
        restore_strategy_state(strategy, resume.strategy_state)
        initial_arrays = ArrayRecord(resume.state_dict)

    def after_round(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if resume is not None and flower_round == 0:
            return None  # evaluated and checkpointed before the run stopped
        server_round = offset + flower_round
        metrics = evaluate_round(server_round, arrays)
        save_checkpoint(
            directory,
            server_round,
            arrays.to_torch_state_dict(),
            {
                "strategy": strategy_state(strategy),
                "rng": rng_state(),
                "record": recorder.state(),
            },
        )
        pause_after(config, server_round, recorder.run_dir)
        return metrics

    if resume is not None:
        restore_rng(resume.rng_state)  # the last thing before round offset+1 samples nodes
    ShiftedRounds(strategy, offset).start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=config.rounds - offset,
        timeout=config.round_timeout,
        evaluate_fn=after_round,
        **start_options,
    )


def pause_after(config: RunConfig, server_round: int, run_dir: Path) -> None:
    """Raise RunPaused when `server_round` (checkpointed) is the run's `stop-after-round`."""
    if 0 < config.stop_after_round == server_round < config.rounds:
        raise RunPaused(
            f"paused after round {server_round} of {config.rounds} (--stop-after-round); "
            f"continue with --resume {run_dir}"
        )


def resume_config(run_dir: Path, scenario: str | None = None) -> RunConfig:
    """The config to resume `run_dir` with; ConfigError (one line) when it cannot be.

    `scenario` (simulate's sub-command) must match the run's.
    """
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(
            f"--resume {run_dir}: no config.json there; pass the directory of a FedModel run"
        )
    config = RunConfig.from_run_config(json.loads(config_path.read_text())).located_in(run_dir)
    if scenario is not None and config.scenario != scenario:
        raise ConfigError(
            f"--resume {run_dir}: that run is a '{config.scenario}' run; use "
            f"'fedmodel simulate {config.scenario} --resume {run_dir}'"
        )
    if config.distributed_dp:
        raise ConfigError(
            f"--resume {run_dir}: a --dp distributed run cannot be resumed yet (its releases "
            "are accounted by round as the run goes); start a new run"
        )
    resume = load_resume_point(run_dir / CHECKPOINTS_DIR)
    if resume is None:
        raise ConfigError(
            f"--resume {run_dir}: no resumable checkpoint (checkpoints/latest.pt); "
            "the run stopped before its first checkpoint, start it again"
        )
    if resume.completed_round >= config.rounds:
        raise ConfigError(
            f"--resume {run_dir}: the run is already complete ({resume.completed_round} of "
            f"{config.rounds} rounds); nothing to resume"
        )
    return config.replace(resume=True, stop_after_round=0, output_dir=str(run_dir.absolute()))
