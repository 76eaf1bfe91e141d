"""Shared fixtures: the real flchain data and an independent epsilon oracle and check."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadFileScheduling

from fedmodel.data import TabularData


@pytest.fixture(scope="session")
def flchain() -> tuple[TabularData, TabularData]:
    from fedmodel.datasets.medical import load_flchain

    return load_flchain()


def dp_accounting_epsilon(
    history: list[tuple[float, float, int]], delta: float, pld: bool = False
) -> float:
    """Epsilon from Google's dp-accounting: code that shares nothing with ours or Opacus's."""
    import dp_accounting

    logging.getLogger("absl").setLevel(logging.ERROR)
    accountant = dp_accounting.pld.PLDAccountant() if pld else dp_accounting.rdp.RdpAccountant()
    for noise, rate, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, int(steps)))
    return float(accountant.get_epsilon(delta))


def opacus_stepped_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """A fresh Opacus accountant fed the mechanisms step by step, as training feeds it."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for noise, rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
    return float(accountant.get_epsilon(delta))


def assert_epsilons_recompute(
    summary: Mapping[str, Any], rows: Mapping[str, int] | None = None
) -> None:
    """Every client's reported epsilon, recomputed from the mechanism its data size and
    the run config imply: q = 1/L and L steps per local epoch (L = ceil(rows / batch),
    the batch at most a quarter of the rows), for each round it trained; only the noise
    multiplier is the client's own choice. Checked with a fresh Opacus accountant
    (exactly), with dp-accounting's RDP (within 1%) and PLD (never above), after every
    round. `rows` overrides the counts
    in the summary where the nodes released them rounded.
    """
    from opacus.accountants import RDPAccountant

    config = summary["config"]
    for client in summary["clients"]:
        examples = rows[client["node"]] if rows else client["num_examples"]
        # a small client's batch is at most a quarter of its rows (docs/sweep.md#small-sites)
        batch = min(config["batch_size"], max(1, examples // 4))
        batches = -(-examples // batch)
        ((noise, rate, steps),) = client["history"]  # one run: one calibrated mechanism
        by_round = [epsilon for _, epsilon in client["epsilon_by_round"]]
        assert rate == 1 / batches, client
        assert steps == len(by_round) * config["local_epochs"] * batches, client
        for trained, reported in enumerate(by_round, start=1):
            mechanism = [(noise, 1 / batches, trained * config["local_epochs"] * batches)]
            fresh = RDPAccountant()
            fresh.history = mechanism
            assert reported == pytest.approx(fresh.get_epsilon(client["delta"]), rel=1e-9)
            rdp = dp_accounting_epsilon(mechanism, client["delta"])
            assert reported == pytest.approx(rdp, rel=0.01)
        assert dp_accounting_epsilon(mechanism, client["delta"], pld=True) <= reported
        assert client["epsilon"] == by_round[-1]


def deployed_node_context(directory: Path, config: Any, budget_epsilon: float) -> Any:
    """The Context a deployed node's executor hands its ClientApp: a data file (which
    marks a deployed node), the ledger in `directory`, the owner's budget at delta 1e-5."""
    from flwr.app import Context, RecordDict

    node_config: dict[str, str | int | float] = {
        "data-path": str(directory / "data.csv"),
        "ledger-path": str(directory / "privacy-ledger.sqlite"),
        "budget-epsilon": budget_epsilon,
        "budget-delta": 1e-5,
    }
    return Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
        run_config=dict(config.to_run_config()),
    )  # fmt: skip


def table_rows(config: Any, data: TabularData, index: int = 0) -> Any:
    """`data` as the ClientRows a node trains: its rows and the tabular task of its width."""
    from client.local_data import ClientRows
    from fedmodel.table_task import table_task

    return ClientRows(index, data.dataset(), table_task(config, data.num_features, 2))


def resolved_config(config: Any, clients_given: bool) -> Any:
    """`config` with the client count its scenario's data fixes, as `simulate` resolves it."""
    from fedmodel.task_loading import load_task, resolve_clients

    return resolve_clients(config, load_task(config), clients_given)


@pytest.fixture
def browser() -> Iterator[object]:
    """A headless Chromium (Selenium WebDriver) for tests of pages in a real browser."""
    from tests.browser import chromium

    with chromium() as driver:
        yield driver


def pytest_configure(config: pytest.Config) -> None:
    """Tests press Ctrl-C (SIGINT) on the commands they start, as a user's terminal does.
    A suite started as a background job of a script inherits SIGINT ignored, and so would
    every command it starts (Python then never raises KeyboardInterrupt): restore it."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files that hold slow end-to-end tests first, each file's tests in their order.

    Under `--dist loadfile --no-loadscope-reorder` (`make test`) xdist hands out files in
    this order: the long, mostly waiting federations start early and the quick files fill
    the end, so no worker finishes minutes before the other (xdist's own order, most
    tests first, left the README run and others last).
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: False sorts first


class _SharedFederationScheduling(LoadFileScheduling):
    """`--dist loadfile`, except that the files of tests/shared_federation/ are one unit:
    they then run on one worker, one after another, and start their package-scoped
    federation once instead of once per file (about 50 s each on 2 cores)."""

    def _split_scope(self, nodeid: str) -> str:
        if nodeid.startswith(f"{SHARED_FEDERATION_PACKAGE}/"):
            return SHARED_FEDERATION_PACKAGE
        return super()._split_scope(nodeid)


SHARED_FEDERATION_PACKAGE = "tests/shared_federation"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> object | None:
    """xdist's hook: our scheduling for `--dist loadfile`, xdist's own otherwise."""
    if config.getvalue("dist") == "loadfile":
        return _SharedFederationScheduling(config, log)
    return None
