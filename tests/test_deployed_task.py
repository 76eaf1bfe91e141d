"""A user's Task in deployment: installed with pip, approved by hash, named, never shipped.

The task is a real package, built and installed offline with pip into a directory
(`--target`), as a node owner installs it; the directory goes on the path, where
`importlib.metadata` finds its `fedmodel.tasks` entry point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from client.local_data import installed_user_task
from client.tasks import (
    BUILTIN_TASK,
    approval_refusal,
    approve,
    installed_task,
    installed_tasks,
    load_approvals,
)
from fedmodel.config import RunConfig
from fedmodel.data import row_count
from fedmodel.errors import TaskError
from fedmodel.privacy.ledger import COMMITTED, PENDING, PrivacyLedger
from tests.conftest import assert_epsilons_recompute, deployed_node_context
from tests.federation import (
    FEDMODEL,
    federation_workspace,
    fedmodel,
    join_node,
    start_server,
    wait_until_activated,
    wait_until_online,
    write_sites,
)

TASK = "sitetask"
VERSION = "1.2.0"

# What the user writes: a 2-layer MLP on the numeric columns of flchain: a deployed node's
# own CSV, or in simulation the copy that ships with FedModel. One task, both places.
TASK_MODULE = '''
"""A two-layer MLP predicting death from a node's flchain CSV (its numeric columns)."""

from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits
from torch.utils.data import Dataset, TensorDataset

from fedmodel.datasets.medical import load_flchain_frame
from fedmodel.task import Site, Task

FEATURES = ["age", "kappa", "lambda", "flc.grp", "creatinine", "mgus"]


def rows(path: Path) -> TensorDataset:
    """A deployed node's rows: its own CSV."""
    return table_rows(pd.read_csv(path))


def site_rows(site: Site) -> TensorDataset:
    """A simulated site's rows: its share of the 80% of flchain that ships with FedModel."""
    frame = shipped_flchain()
    train = frame.iloc[: int(0.8 * len(frame))]
    return table_rows(train.iloc[site.partition_id :: site.num_partitions])


def test_rows(seed: int) -> TensorDataset:
    frame = shipped_flchain()
    return table_rows(frame.iloc[int(0.8 * len(frame)) :])


def shipped_flchain() -> pd.DataFrame:
    return load_flchain_frame().sample(frac=1.0, random_state=1)


def table_rows(frame: pd.DataFrame) -> TensorDataset:
    columns = frame[FEATURES].fillna(frame[FEATURES].median())
    inputs = torch.tensor(columns.to_numpy(), dtype=torch.float32)
    inputs = (inputs - inputs.mean(0)) / (inputs.std(0) + 1e-6)
    return TensorDataset(inputs, torch.tensor(frame["death"].to_numpy(), dtype=torch.float32))


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(len(FEATURES), 16), nn.ReLU(), nn.Linear(16, 1))


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return binary_cross_entropy_with_logits(outputs[:, 0], targets, reduction="none")


def no_simulation(_: object) -> Dataset:
    raise RuntimeError("this task runs on deployed nodes only")


task = Task(
    name="sitetask", model=model, loss=loss, train_data=site_rows,
    test_data=test_rows, local_data=rows, version="1.2.0",
)
simulation_only = Task(
    name="simulation-only", model=model, loss=loss, train_data=no_simulation,
    test_data=no_simulation,
)
'''


def install_task_package(
    target: Path, entry_points: dict[str, str], project: str = TASK, single_module: bool = False
) -> Path:
    """Build and pip-install (offline, no dependencies) a task package into `target`.

    `entry_points`: its `fedmodel.tasks` entry points, name -> "module:attribute";
    `single_module`: a top-level module file, not a package directory. Returns the
    installed source file.
    """
    source = target.parent / f"{target.name}-source"
    source.mkdir(parents=True)
    if single_module:
        (source / f"{project}.py").write_text(TASK_MODULE)
        layout = f'py-modules = ["{project}"]'
    else:
        (source / project).mkdir()
        (source / project / "__init__.py").write_text(TASK_MODULE)
        layout = f'packages = ["{project}"]'
    points = "\n".join(f'"{name}" = "{value}"' for name, value in entry_points.items())
    (source / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{project}"
            version = "{VERSION}"

            [tool.setuptools]
            {layout}

            [project.entry-points."fedmodel.tasks"]
            """)
        + points
        + "\n"
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    if single_module:
        return target / f"{project}.py"
    return target / project / "__init__.py"


@pytest.fixture(scope="module")
def both_tasks_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package with both tasks as entry points, pip-installed once for the module
    (pip costs seconds of CPU): its directory, which tests copy (`copied`) and change."""
    target = tmp_path_factory.mktemp("both") / "site-packages"
    install_task_package(
        target, {TASK: f"{TASK}:task", "simulation-only": f"{TASK}:simulation_only"}
    )
    return target


@pytest.fixture(scope="module")
def task_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package with the deployable task alone, pip-installed once for the module."""
    target = tmp_path_factory.mktemp("one") / "site-packages"
    install_task_package(target, {TASK: f"{TASK}:task"})
    return target


def copied(installation: Path, target: Path) -> Path:
    """A copy at `target` of a pip installation (what pip puts there); its module file."""
    shutil.copytree(installation, target)
    return target / TASK / "__init__.py"


@pytest.fixture
def installed(
    both_tasks_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """The task package installed into tmp_path/site-packages, on sys.path; its module file."""
    module = copied(both_tasks_package, tmp_path / "site-packages")
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    yield module
    sys.modules.pop(TASK, None)  # the next test installs and imports its own copy


def with_install(directory: Path) -> dict[str, str]:
    """This process's environment with `directory` first on PYTHONPATH."""
    path = os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def test_an_installed_task_is_listed_with_its_package_version_and_source(installed: Path) -> None:
    tasks = installed_tasks()
    assert set(tasks) == {BUILTIN_TASK, TASK, "simulation-only"}
    task = tasks[TASK]
    assert task.version == VERSION  # the distribution pip installed
    assert task.client_app == tasks[BUILTIN_TASK].client_app  # the one production ClientApp
    # the task's package, and the FedModel code that runs it
    assert task.source_roots == (installed.parent, *tasks[BUILTIN_TASK].source_roots)
    assert task.source_digest() != tasks[BUILTIN_TASK].source_digest()


def test_a_changed_task_file_needs_the_owners_approval_again(
    installed: Path, tmp_path: Path
) -> None:
    node = tmp_path / "node"
    node.mkdir()
    approved = approve(node, TASK)
    assert approved.sha256 == installed_task(TASK).source_digest()
    assert approval_refusal(load_approvals(node), TASK, VERSION) is None

    installed.write_text(installed.read_text() + "\nSTOLEN = []\n")  # one line, no new file
    assert installed_task(TASK).source_digest() != approved.sha256
    refusal = approval_refusal(load_approvals(node), TASK, VERSION)
    assert refusal is not None and "changed since the owner approved it" in refusal
    assert approve(node, TASK).sha256 == installed_task(TASK).source_digest()
    assert approval_refusal(load_approvals(node), TASK, VERSION) is None


def test_a_task_that_is_one_module_file_is_hashed_as_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = install_task_package(
        tmp_path / "lib", {"onefile": "onefile:task"}, project="onefile", single_module=True
    )
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    task = installed_task("onefile")
    assert task.source_roots[0] == module.resolve()
    before = task.source_digest()
    (tmp_path / "lib" / "unrelated.py").write_text("x = 1\n")  # beside it: not the task
    assert task.source_digest() == before
    module.write_text(module.read_text().replace("16", "32"))
    assert task.source_digest() != before


def test_a_task_named_like_the_builtin_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builtin = approve(tmp_path, BUILTIN_TASK)
    install_task_package(tmp_path / "lib", {BUILTIN_TASK: "impostor:task"}, project="impostor")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    with pytest.raises(TaskError, match="'fedmodel-tabular' .* takes the name of another task"):
        installed_tasks()
    # while it is installed, the node serves not even the approved built-in task
    refusal = approval_refusal(load_approvals(tmp_path), BUILTIN_TASK, builtin.version)
    assert refusal is not None and "impostor:task" in refusal


def test_a_node_trains_the_installed_task_with_dp_and_scores_its_holdout(
    installed: Path, tmp_path: Path
) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import train_handler
    from client.local_data import describe_local_data, local_training_rows
    from fedmodel.protocol import (
        ARRAYS_KEY,
        CLIENT_INDEX_KEY,
        CONFIG_KEY,
        METRICS_KEY,
        SERVER_ROUND_KEY,
        STATISTICS_KEY,
        STATISTICS_RECORD_KEY,
    )
    from fedmodel.task_loading import task_from_reference
    from server.reply_schema import riding_evaluation, train_report

    write_sites(tmp_path, ["node"], rows=120)
    (tmp_path / "node.csv").rename(tmp_path / "data.csv")
    config = RunConfig(
        scenario="deployment", app_task=TASK, app_task_version=VERSION, epsilon=1.0,
        rounds=2, batch_size=32, device="cpu",
    )  # fmt: skip
    context = deployed_node_context(tmp_path, config, budget_epsilon=2.0)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # a node's task
    query = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    answer = describe_local_data(query, context).content.config_records[STATISTICS_RECORD_KEY]
    assert STATISTICS_KEY not in answer  # a user task's node describes none of its rows

    torch.manual_seed(0)
    model = task_from_reference(TASK, config).model()
    shared = ConfigRecord({CLIENT_INDEX_KEY: json.dumps({"1": 3}), SERVER_ROUND_KEY: 1})
    content = RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), CONFIG_KEY: shared})
    message = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    rows = local_training_rows(context, message)
    assert (rows.index, row_count(rows.data), rows.task.name) == (3, 96, TASK)  # 80% of 120

    reply = train_handler(local_training_rows)(message, context)
    assert not reply.has_error()
    metrics = dict(reply.content.metric_records[METRICS_KEY])
    report = train_report(metrics, sample_dp=True)
    assert report.num_examples == 96 and report.epsilon is not None
    assert 0 < report.epsilon <= 1.0 + 1e-6
    evaluation = riding_evaluation(metrics)  # what it scored first: the model it received
    assert evaluation is not None and evaluation.num_examples == 24
    assert evaluation.accuracy is not None and 0 < evaluation.auroc < 1
    assert evaluation.auroc_weight == 24
    trained = reply.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in model.state_dict().items())
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.sqlite")  # written ahead, committed
    assert [(e.server_round, e.status) for e in ledger.entries()] == [
        (1, PENDING), (1, COMMITTED)
    ]  # fmt: skip


def test_a_task_without_local_data_cannot_run_on_a_node(installed: Path, tmp_path: Path) -> None:
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.local_data import local_training_rows
    from fedmodel.protocol import CLIENT_INDEX_KEY, CONFIG_KEY

    (tmp_path / "data.csv").write_text("age,death\n1,0\n")
    config = RunConfig(scenario="deployment", app_task="simulation-only", app_task_version=VERSION)
    context = deployed_node_context(tmp_path, config, budget_epsilon=2.0)
    shared = ConfigRecord({CLIENT_INDEX_KEY: json.dumps({"1": 0})})
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # a node's task
    message = Message(
        RecordDict({CONFIG_KEY: shared}), dst_node_id=1, message_type=MessageType.TRAIN
    )
    with pytest.raises(TaskError, match="'simulation-only' has no local_data"):
        local_training_rows(context, message)
    named = RunConfig(scenario="deployment", app_task=f"{TASK}:task")  # a module, not a name
    with pytest.raises(TaskError, match="no task named 'sitetask:task' is installed"):
        local_training_rows(deployed_node_context(tmp_path, named, 2.0), message)


def test_a_regression_evaluation_is_scored_by_its_loss_alone() -> None:
    from server.federated_evaluation import combine_evaluations
    from server.reply_schema import EvaluationReport, evaluation_report

    regression = {"num-examples": 20, "loss": 2.5, "auroc": 0.0, "auroc-weight": 0}
    report = evaluation_report(regression)
    assert report == EvaluationReport(20, 2.5, None, 0.0, 0)
    classifier = EvaluationReport(20, 0.5, 0.9, 0.8, 20)
    assert combine_evaluations([(report, 1), (report, 1)]) == {
        "loss": 2.5, "accuracy": 0.0, "auroc": 0.0  # no node speaks to either: 0
    }  # fmt: skip
    # accuracy rests on the nodes that report one; the loss on every node
    assert combine_evaluations([(report, 1), (classifier, 1)]) == {
        "loss": 1.5, "accuracy": 0.9, "auroc": 0.8
    }  # fmt: skip


@pytest.mark.slow  # five CLI processes
def test_the_cli_lists_approves_and_names_installed_tasks(
    task_package: Path, tmp_path: Path
) -> None:
    copied(task_package, tmp_path / "lib")
    env = with_install(tmp_path / "lib")
    node = tmp_path / "node"
    assert fedmodel("client", "init", "--dir", node, env=env).returncode == 0
    listing = fedmodel("client", "tasks", "--dir", node, env=env)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any(line.startswith(f"{BUILTIN_TASK} ") and "(approved)" in line for line in lines)
    assert any(line.startswith(f"{TASK} {VERSION}  (NOT APPROVED") for line in lines), lines

    approved = fedmodel("client", "approve", "--dir", node, TASK, env=env)
    assert approved.returncode == 0, approved.stderr
    (entry,) = [a for a in json.loads((node / "approvals.json").read_text()) if a["name"] == TASK]
    assert approved.stdout.strip() == f"Approved {TASK} {VERSION}: source SHA-256 {entry['sha256']}"
    assert (
        f"{TASK} {VERSION}  (approved)"
        in fedmodel("client", "tasks", "--dir", node, env=env).stdout
    )

    unknown = fedmodel("run", "--dir", tmp_path / "srv", "--installed-task", "nosuchtask", env=env)
    assert unknown.returncode == 2
    (line,) = unknown.stderr.strip().splitlines()
    assert "no task named 'nosuchtask'" in line and f"{BUILTIN_TASK}, {TASK}" in line, line


@pytest.mark.slow
def test_an_installed_task_trains_on_a_tls_federation_of_the_nodes_that_approved_it(
    task_package: Path, tmp_path: Path
) -> None:
    """Three owners install the task with pip; two approve it. The coordinator, which has
    it installed too, names it: the two train it under DP, the third refuses."""
    copied(task_package, tmp_path / "lib")
    env = with_install(tmp_path / "lib")
    sites = ["clinic-a", "clinic-b", "clinic-c"]
    with federation_workspace(tmp_path) as space:
        server = tmp_path / "srv"
        start_server(server, env)  # the ServerApp builds the task's model from its own copy
        data = write_sites(tmp_path, sites)
        started = {}
        for site in sites:
            started[site] = join_node(space, server, tmp_path / site, data[site], 3.0, env)
            if site != "clinic-c":
                approved = subprocess.run(
                    [*FEDMODEL, "client", "approve", "--dir", tmp_path / site, TASK],
                    capture_output=True, text=True, timeout=60, env=env,
                )  # fmt: skip
                assert approved.returncode == 0, approved.stderr
        for site, node in started.items():
            wait_until_activated(tmp_path / site, node)
        wait_until_online(server, 3)
        started = time.monotonic()
        run = fedmodel(
            "run", "--dir", server, "--installed-task", TASK, "--rounds", "2", "--epsilon", "2.0",
            "--min-clients", "2", "--batch-size", "32", "--round-timeout", "120",
            "--output", tmp_path / "run", timeout=300, env=env,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] and not summary["stopped_early"]
    assert [row["round"] for row in summary["per_round"]] == [1, 2]
    assert all(row["clients"] == 2 for row in summary["per_round"])
    assert 0 < summary["per_round"][-1]["auroc"] < 1  # scored on the two nodes' hold-outs
    assert sorted(client["node"] for client in summary["clients"]) == ["clinic-a", "clinic-b"]
    for client in summary["clients"]:
        assert 0 < client["epsilon"] <= 2.0 + 1e-6
        spent = PrivacyLedger(tmp_path / client["node"] / "privacy-ledger.sqlite").entries()
        assert [entry.server_round for entry in spent if entry.status == COMMITTED] == [1, 2]
    # the node whose owner did not approve the task refused it before reading a row
    audit = [json.loads(line) for line in (tmp_path / "clinic-c" / "node-audit.jsonl").open()]
    (refused,) = [event for event in audit if event["event"] == "refused"]
    assert (
        refused["reason"] == f"task '{TASK}' version {VERSION} is not approved by this node's owner"
    )
    assert not [event for event in audit if event["event"] == "served"]
    assert not (tmp_path / "clinic-c" / "privacy-ledger.sqlite").exists() or not list(
        PrivacyLedger(tmp_path / "clinic-c" / "privacy-ledger.sqlite").entries()
    )
    assert "clinic-c" in run.stdout and "not approved" in run.stdout
    print(f"2-round deployment of an installed user task on 3 nodes: {elapsed:.0f} s")


@pytest.mark.slow
def test_the_installed_task_simulates_by_its_name_and_its_audit_verifies(
    task_package: Path, tmp_path: Path
) -> None:
    """The same installed task as the TLS run above, named by its entry point in a
    simulation; a relative PYTHONPATH, as a user types it, reaches the engine's workers."""
    copied(task_package, tmp_path / "lib")
    env = {**os.environ, "PYTHONPATH": "lib"}
    small = ["--clients", "3", "--rounds", "2", "--epsilon", "1", "--no-baselines"]
    run = subprocess.run(
        [*FEDMODEL, "simulate", "task", TASK, *small, "--output", "run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["federation"]["task"] == TASK and len(summary["clients"]) == 3
    assert_epsilons_recompute(summary)
    assert summary["final"]["auroc"] > 0.7  # flchain's mortality signal, learnt under DP
    audit = subprocess.run(
        [*FEDMODEL, "audit", "ledgers", "run", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert audit.returncode == 0 and json.loads(audit.stdout)["ok"] is True, audit.stdout


def test_a_node_resolves_only_installed_task_names_never_a_module_reference(
    installed: Path,
) -> None:
    """Behind the approval gate, a second wall: `app-task` is looked up among this
    machine's installed tasks only, so a coordinator's module:attribute is never imported."""
    for reference in ("os:system", "fedmodel.datasets.tabular_task:tabular_task"):
        with pytest.raises(TaskError, match=f"no task named '{reference}' is installed"):
            installed_user_task(RunConfig(app_task=reference))
    assert installed_user_task(RunConfig(app_task=TASK)).name == TASK
