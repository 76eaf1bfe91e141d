"""One started TLS federation (a SuperLink and three enrolled SuperNodes), shared by the
suites of this package.

The fixture is package-scoped: it stops when this package's last test ends, so its
idle SuperNodes do not poll through the rest of the suite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversarial.tampered_executor import tampered_copy
from tests.federation import Site, Workspace, joined_federation

HONEST_SITES = ("site-a", "site-b")
HOSTILE_SITE = "site-z"  # honest unless a test writes its plan
SHARED_BUDGET = 10  # each owner's


@dataclasses.dataclass(frozen=True)
class SharedFederation:
    """A TLS federation on 127.0.0.1 with three enrolled nodes, shared by the suites
    of this package, whose needs agree (test_hostile_node.py, test_run_liveness.py).

    A test leaves it as it found it: a plan it gives site-z is removed after it, a node
    it revokes is one it joined itself, and its own processes stop when it ends.
    """

    space: Workspace
    server: Path
    plan: Path  # site-z follows it (tests/adversarial/tampered_executor.py)


@pytest.fixture(scope="package")
def started_shared_federation(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SharedFederation]:
    """Two honest owners and site-z, whose node runs a tampering copy of FedModel; each
    with budget SHARED_BUDGET. Started for the first test that asks; stopped after the
    package's last test."""
    root = tmp_path_factory.mktemp("shared-federation")
    plan = tampered_copy(root / "code")
    sites = [Site(name, SHARED_BUDGET) for name in HONEST_SITES]
    sites.append(Site(HOSTILE_SITE, SHARED_BUDGET, code=root / "code"))
    with joined_federation(root, sites) as (space, server):
        yield SharedFederation(space, server, plan)


@pytest.fixture
def shared_federation(
    started_shared_federation: SharedFederation,
) -> Iterator[SharedFederation]:
    """The shared federation; site-z is honest again after the test."""
    yield started_shared_federation
    started_shared_federation.plan.unlink(missing_ok=True)
