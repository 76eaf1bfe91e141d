"""FedModel: federated, differentially private training on Flower and Opacus.

The public Python API: the Task (fedmodel.task, `from fedmodel import Task, Site`), the
table a task's model reads (`TableSchema`, fedmodel.table_schema), and
`fedmodel.load_model(PATH)` (fedmodel.trained_model), a trained model ready to score.
They are imported on first use, so `import fedmodel` (and the CLI's start) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Site", "TableSchema", "Task", "__version__", "load_model"]

if TYPE_CHECKING:  # load_model is left out: it reaches back to __version__ here
    from fedmodel.table_schema import TableSchema
    from fedmodel.task import Site, Task

_PUBLIC = {
    "Site": "fedmodel.task",
    "Task": "fedmodel.task",
    "TableSchema": "fedmodel.table_schema",
    "load_model": "fedmodel.trained_model",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fedmodel' has no attribute {name!r}")
