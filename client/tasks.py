"""The tasks installed on this node, and the owner's approval of exactly their source.

A run names the task it wants (`app-task`, `app-task-version` in its run config); the
coordinator chooses those strings and the Flower app bundle (FAB) that carries them, so
neither proves anything. What the node checks is its own installation: the task of that
name and version must be installed here, and the SHA-256 of its source files must be
the one the owner approved (`fedmodel client approve`). A changed file is a different
task until the owner approves it again. Like Fed-BioMed's training-plan approval, but
keyed to the code that actually runs (the installed modules), not to what was sent.

Installed tasks are FedModel's own tabular task and every `fedmodel.tasks` entry point
(a user's Task, installed with pip). Each is a name, a version, the ClientApp that runs
it and the source that makes it up: for a user's task, its package (or single module)
plus FedModel's packages, since that code runs too. Listing, approving and checking a
task never imports it: the source is located by the import system's finder, and the
version is the installed distribution's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import fedmodel
from fedmodel.audit_log import utc_now
from fedmodel.config import TABULAR_TASK, TASK_ENTRY_POINTS
from fedmodel.errors import ExitCode, FedModelError, TaskError
from fedmodel.pki import write_private_file

APPROVALS_FILE = "approvals.json"
BUILTIN_TASK = TABULAR_TASK


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
    # every .py file under these directories is part of the task, and each file root
    source_roots: tuple[Path, ...]

    def source_digest(self) -> str:
        """SHA-256 over each source file's path (relative to its root's parent) and bytes."""
        digest = hashlib.sha256()
        for root in self.source_roots:
            files = [root] if root.is_file() else sorted(root.rglob("*.py"))
            for path in files:
                inside = path.relative_to(root).as_posix()
                relative = root.name if path == root else f"{root.name}/{inside}"
                digest.update(f"{relative}\0{path.stat().st_size}\0".encode())
                digest.update(path.read_bytes())
        return digest.hexdigest()


def _package_root(module_file: str | None) -> Path:
    assert module_file is not None
    return Path(module_file).resolve().parent


def installed_tasks() -> dict[str, InstalledTask]:
    """Every task installed on this node, by name (looked up on each call: files move).

    Raises TaskError for an entry point named like the built-in task, or whose module
    cannot be found: either would make the owner's approval mean something else.
    """
    import client

    # the ClientApp runs code from both packages: the role and the library
    fedmodel_roots = (_package_root(client.__file__), _package_root(fedmodel.__file__))
    builtin = InstalledTask(
        name=BUILTIN_TASK,
        version=fedmodel.__version__,
        client_app="client.app:app",
        secagg_client_app="client.secagg_app:app",
        source_roots=fedmodel_roots,
    )
    tasks = {builtin.name: builtin}
    for point in entry_points(group=TASK_ENTRY_POINTS):
        if point.name in tasks:
            raise TaskError(
                f"the installed task entry point '{point.name}' ({point.value}) takes the name "
                "of another task; rename it in its package's [project.entry-points]"
            )
        tasks[point.name] = InstalledTask(
            name=point.name,
            version=_distribution_version(point),
            client_app=builtin.client_app,
            secagg_client_app=builtin.secagg_client_app,
            source_roots=(_task_source_root(point), *fedmodel_roots),
        )
    return tasks


def _distribution_version(point: EntryPoint) -> str:
    """The version pip installed: what the owner reviewed, read without running the task."""
    if point.dist is None:
        raise TaskError(f"the task entry point '{point.name}' belongs to no installed package")
    return point.dist.version


def _task_source_root(point: EntryPoint) -> Path:
    """The directory of the task module's top-level package, or the module's own file."""
    top_level = point.module.partition(".")[0]
    spec = importlib.util.find_spec(top_level)  # locates it; imports nothing of the task
    if spec is None or spec.origin is None:
        raise TaskError(
            f"the module '{top_level}' of installed task '{point.name}' cannot be found; "
            "reinstall its package"
        )
    origin = Path(spec.origin).resolve()
    return origin.parent if spec.submodule_search_locations is not None else origin


def installed_task(name: str) -> InstalledTask:
    tasks = installed_tasks()
    if name not in tasks:
        raise UnknownTask(
            f"no task named '{name}' is installed here (installed: {', '.join(tasks)})"
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
    except (UnknownTask, TaskError) as missing:
        return str(missing)
    if task.version != version:
        return f"task '{name}' is installed here at version {task.version}, not {version}"
    if task.source_digest() != approved.sha256:
        return (
            f"the source of task '{name}' {version} changed since the owner approved it "
            "(review the change, then 'fedmodel client approve' it again)"
        )
    return None
