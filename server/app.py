"""The deployed ServerApp: a run on the federation's enrolled nodes, evaluated by them.

The nodes hold all the data, so evaluation is federated and this app imports no dataset
catalogue; simulations wire the same run with their scenario's test set
(simulations/apps.py). `fedmodel run` submits this app (pyproject's
[tool.flwr.app.components]).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmodel.config import RunConfig
from server.wiring import FederatedEvaluation, run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds on the enrolled nodes; files land in output-dir."""
    config = RunConfig.from_run_config(context.run_config)
    run_federation(grid, context, config, FederatedEvaluation())
