"""The tasks installed on this node, and the owner's approval of exactly their source.

A run names the task it wants (`app-task`, `app-task-version` in its run config); the
coordinator chooses those strings and the Flower app bundle (FAB) that carries them, so
neither proves anything. What the node checks is its own installation: the task of that
name and version must be installed here, and the SHA-256 of its source files must be
the one the owner approved (`fedmodel client approve`). A changed file is a different
task until the owner approves it again. Like Fed-BioMed's training-plan approval, but
keyed to the code that actually runs (the installed modules), not to what was sent.

Today one task is installed: FedModel's own tabular ClientApp. User-written tasks (the
Task API) register here the same way: a name, a version, an app reference and the
source files that make it up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import fedmodel
from fedmodel.audit_log import utc_now
from fedmodel.errors import ExitCode, FedModelError
from fedmodel.pki import write_private_file

APPROVALS_FILE = "approvals.json"
BUILTIN_TASK = "fedmodel-tabular"


class UnknownTask(FedModelError):
    """A task name that is not installed on this node."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class InstalledTask:
    """A task this node can run: its ClientApp and the source trees that define it."""

    name: str
    version: str
    client_app: str  # "module:attribute" of the ClientApp
    secagg_client_app: str  # the same task behind Flower's SecAgg+ client mod
    source_roots: tuple[Path, ...]  # every .py file under these is part of the task

    def source_digest(self) -> str:
        """SHA-256 over each source file's path (relative to its root) and bytes."""
        digest = hashlib.sha256()
        for root in self.source_roots:
            for path in sorted(root.rglob("*.py")):
                relative = f"{root.name}/{path.relative_to(root).as_posix()}"
                digest.update(f"{relative}\0{path.stat().st_size}\0".encode())
                digest.update(path.read_bytes())
        return digest.hexdigest()


def _package_root(module_file: str | None) -> Path:
    assert module_file is not None
    return Path(module_file).resolve().parent


def installed_tasks() -> dict[str, InstalledTask]:
    """Every task installed on this node, by name (looked up on each call: files move)."""
    import client

    builtin = InstalledTask(
        name=BUILTIN_TASK,
        version=fedmodel.__version__,
        client_app="client.app:app",
        secagg_client_app="client.secagg_app:app",
        # the ClientApp runs code from both packages: the role and the library
        source_roots=(_package_root(client.__file__), _package_root(fedmodel.__file__)),
    )
    return {builtin.name: builtin}


def installed_task(name: str) -> InstalledTask:
    tasks = installed_tasks()
    if name not in tasks:
        raise UnknownTask(
            f"no task named '{name}' is installed on this node (installed: {', '.join(tasks)})"
        )
    return tasks[name]


@dataclass(frozen=True)
class ApprovedTask:
    """One task the owner approved: its name, version and the SHA-256 of its source."""

    name: str
    version: str
    sha256: str
    approved_at: str


def load_approvals(directory: Path) -> list[ApprovedTask]:
    path = directory / APPROVALS_FILE
    if not path.exists():
        return []
    return [ApprovedTask(**entry) for entry in json.loads(path.read_text())]


def save_approvals(directory: Path, approvals: list[ApprovedTask]) -> None:
    text = json.dumps([dataclasses.asdict(entry) for entry in approvals], indent=2) + "\n"
    write_private_file(directory / APPROVALS_FILE, text.encode(), force=True)


def approve(directory: Path, name: str) -> ApprovedTask:
    """Approve the installed task `name` as its source is now (replacing an older approval)."""
    task = installed_task(name)
    approved = ApprovedTask(task.name, task.version, task.source_digest(), utc_now())
    others = [a for a in load_approvals(directory) if (a.name, a.version) != (name, task.version)]
    save_approvals(directory, [*others, approved])
    return approved


def revoke_approval(directory: Path, name: str) -> list[ApprovedTask]:
    """Withdraw every approval of `name`; returns what was withdrawn."""
    approvals = load_approvals(directory)
    withdrawn = [a for a in approvals if a.name == name]
    if not withdrawn:
        raise UnknownTask(f"no task named '{name}' is approved on this node")
    save_approvals(directory, [a for a in approvals if a.name != name])
    return withdrawn


def approval_refusal(approvals: list[ApprovedTask], name: str, version: str) -> str | None:
    """Why a run asking for task `name` `version` may not run here, or None."""
    approved = next((a for a in approvals if (a.name, a.version) == (name, version)), None)
    if approved is None:
        return f"task '{name}' version {version} is not approved by this node's owner"
    try:
        task = installed_task(name)
    except UnknownTask as missing:
        return str(missing)
    if task.version != version:
        return f"task '{name}' is installed here at version {task.version}, not {version}"
    if task.source_digest() != approved.sha256:
        return (
            f"the source of task '{name}' {version} changed since the owner approved it "
            "(review the change, then 'fedmodel client approve' it again)"
        )
    return None
