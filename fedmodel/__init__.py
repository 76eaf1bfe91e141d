"""FedModel: federated, differentially private training on Flower and Opacus.

The public Python API is the Task (fedmodel.task): `from fedmodel import Task, Site`.
It is imported on first use, so `import fedmodel` (and the CLI's start) does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Site", "Task", "__version__"]

if TYPE_CHECKING:
    from fedmodel.task import Site, Task


def __getattr__(name: str) -> Any:
    if name in ("Site", "Task"):
        from fedmodel import task

        return getattr(task, name)
    raise AttributeError(f"module 'fedmodel' has no attribute {name!r}")
