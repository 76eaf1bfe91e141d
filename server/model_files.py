"""The run's model files, written from its checkpoints once the rounds are over.

The final model is the last checkpointed global model (the last evaluated one, also when
a run stops early), so one path serves FedAvg, SecAgg+ and a resumed run alike. The
metadata is the task's: in deployment its table holds only the statistics the query round
merged and sent to every node (server/deployment.py), nothing a single node sent.
"""

from __future__ import annotations

from pathlib import Path

from fedmodel.config import RunConfig
from fedmodel.model_file import model_metadata, save_model_file
from fedmodel.run_directory import CHECKPOINTS_DIR, MODEL_DIR, ROUND_MODELS_DIR, RunSummary
from fedmodel.task import Task
from server.checkpoint import LATEST, load_checkpoint


def write_model_files(run_dir: Path, task: Task, config: RunConfig, summary: RunSummary) -> Path:
    """Write `model/` (and with `save_round_models`, `models/round-NNNN/` for every
    trained round); returns the final model's directory."""
    checkpoints = run_dir / CHECKPOINTS_DIR
    if config.save_round_models:
        for path in sorted(checkpoints.glob("round-*.pt")):
            server_round, state_dict = load_checkpoint(path)
            if server_round > 0:  # round 0 is the untrained model
                save_model_file(
                    run_dir / ROUND_MODELS_DIR / f"round-{server_round:04d}",
                    state_dict,
                    model_metadata(task, config, summary, server_round),
                )
    final_round, state_dict = load_checkpoint(checkpoints / LATEST)
    return save_model_file(
        run_dir / MODEL_DIR, state_dict, model_metadata(task, config, summary, final_round)
    )
