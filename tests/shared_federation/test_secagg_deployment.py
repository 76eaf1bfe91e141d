"""`fedmodel run --secagg` on the shared TLS federation: the coordinator sees masked
vectors only, and the unmasked sum is the survivors' when a node dies mid-round.

Four nodes: the three shared ones and site-s, which the test joins and kills after it
has shared its keys, before it sends its masked vector. Every node keeps its plaintext
updates in its own directory (client/secagg_app.py `keep_update`), never sent anywhere;
the run keeps every reply the ServerApp receives (`--record-messages`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.secagg_app import UPDATES_DIR
from fedmodel.secagg import quantization_error_bound
from server.checkpoint import load_checkpoint
from server.enrollment import load_registry
from server.recording_grid import RECEIVED_DIR, received_content, received_index
from server.superlink import Federation
from tests.federation import (
    background,
    federation_workspace,
    join_node,
    wait_for_text,
    wait_until_online,
    write_sites,
)
from tests.shared_federation.conftest import (
    HONEST_SITES,
    HOSTILE_SITE,
    SHARED_BUDGET,
    SharedFederation,
)

pytestmark = pytest.mark.slow
SHARED_SITES = (*HONEST_SITES, HOSTILE_SITE)
DROPPED = "site-s"  # the test's own node, killed mid-round
COLLECTED = "(collect_masked_vectors): answered"


def masked_vectors(run_dir: Path) -> dict[int, np.ndarray]:
    """Each node's masked model vector as the ServerApp received it, flattened, by node ID."""
    received = run_dir / RECEIVED_DIR
    vectors = {}
    for entry in received_index(received):
        if entry["error"] is not None:
            continue
        record = received_content(received, entry).config_records.get(RECORD_KEY_CONFIGS)
        if record is not None and Key.MASKED_PARAMETERS in record:
            masked = cast(list[bytes], record[Key.MASKED_PARAMETERS])
            # the first part is the node's weight, masked too; the model's weights follow
            parts = [bytes_to_ndarray(part) for part in masked[1:]]
            vectors[int(str(entry["node_id"]))] = np.concatenate([p.ravel() for p in parts])
    return vectors


def kept_update(node: Path) -> list[np.ndarray]:
    """The plaintext update `node` kept of round 1 (one run per test)."""
    (path,) = (node / UPDATES_DIR).glob("run-*-round-1.npz")
    with np.load(path) as arrays:
        return [arrays[f"arr_{index}"] for index in range(len(arrays.files))]


def run_secagg_and_kill_dropped(
    started: list[subprocess.Popen[str]], server: Path, dropped: Path, survivor: Path
) -> None:
    """`fedmodel run --secagg` on four nodes, one round, in `dropped`'s parent directory.

    Once `dropped` has answered the share-keys stage its executor is paused, so it never
    trains; once `survivor` has sent its masked vector (its shares, `dropped`'s among
    them, went through the coordinator), `dropped`'s SuperNode is killed. (Killed any
    sooner, its key shares might never leave it: Flower 1.39's neighbours then fail to
    unmask, and the round halts.)
    """
    work = dropped.parent
    before = (survivor / "executor.log").read_text().count(COLLECTED)
    run = background(
        "run", "--dir", server, "--secagg", "--secagg-shares", "3",
        "--secagg-threshold", "2", "--min-clients", "3", "--rounds", "1",
        "--round-timeout", "30", "--batch-size", "32", "--record-messages",
        "--output", work / "secagg", log=work / "secagg.out",
    )  # fmt: skip
    started.append(run)
    wait_for_text(dropped / "executor.log", "(share_keys): answered", run, 240)
    executor = int((dropped / "executor.pid").read_text())
    os.killpg(executor, signal.SIGSTOP)
    try:
        wait_for_text(survivor / "executor.log", COLLECTED, run, 240, count=before + 1)
        os.kill(int((dropped / "supernode.pid").read_text()), signal.SIGKILL)
        assert run.wait(timeout=300) == 0, (work / "secagg.out").read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(executor, signal.SIGKILL)


def test_secagg_run_shows_the_coordinator_masked_vectors_only_and_survives_a_killed_node(
    shared_federation: SharedFederation, tmp_path: Path
) -> None:
    server = shared_federation.server
    nodes = {name: server.parent / name for name in SHARED_SITES} | {DROPPED: tmp_path / DROPPED}
    run_dir = tmp_path / "secagg"
    try:
        with federation_workspace(tmp_path) as space:  # stops the test's run and its node
            data = write_sites(tmp_path, [*SHARED_SITES, DROPPED])[DROPPED]
            join_node(space, server, nodes[DROPPED], data, SHARED_BUDGET)
            for node in nodes.values():
                (node / UPDATES_DIR).mkdir(parents=True, exist_ok=True)
            wait_until_online(server, len(nodes))
            survivor = nodes[HONEST_SITES[0]]
            run_secagg_and_kill_dropped(space.started, server, nodes[DROPPED], survivor)
        updates = {name: kept_update(node) for name, node in nodes.items() if name != DROPPED}
    finally:
        for name in SHARED_SITES:  # the shared nodes keep nothing after this test
            shutil.rmtree(nodes[name] / UPDATES_DIR, ignore_errors=True)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and not summary["stopped_early"]
    report = json.loads((run_dir / "secagg.json").read_text())
    assert report["protocol"]["max_weight"] == 1  # uniform weights: no node's size inside
    (round_1,) = report["rounds"]
    assert (round_1["sampled"], round_1["survivors"]) == (4, 3)
    for name in SHARED_SITES:  # every stage served by the survivors
        served = (nodes[name] / "executor.log").read_text()
        for stage in ("setup", "share_keys", "collect_masked_vectors", "unmask"):
            assert f"train ({stage}): answered" in served, (name, stage)
    assert not list((nodes[DROPPED] / UPDATES_DIR).iterdir())  # killed before it trained

    # The coordinator received a masked vector from each survivor and none from site-s,
    # and none of them resembles its node's update.
    registry = load_registry(Federation.load(server))
    node_ids = {name: int(registry[name]["node_id"]) for name in nodes}
    vectors = masked_vectors(run_dir)
    assert set(vectors) == {node_ids[name] for name in SHARED_SITES}
    pairs = [(vectors[node_ids[name]], np.concatenate([a.ravel() for a in updates[name]]))
             for name in SHARED_SITES]  # fmt: skip
    for masked, update in pairs:
        assert masked.dtype.kind in "iu" and masked.shape == update.shape
    # pooled over the three nodes (865 weights each): |r| of independent vectors that
    # long exceeds 0.05 with probability about 1% (one node's alone: about 14%)
    masked = np.concatenate([m.astype(np.float64) for m, _ in pairs])
    update = np.concatenate([u.astype(np.float64) for _, u in pairs])
    r = float(np.corrcoef(masked, update)[0, 1])
    print(f"masked vectors vs true updates: r = {r:.4f} over {masked.size} weights")
    assert abs(r) < 0.05

    # The unmasked mean (round 1's checkpoint) is the survivors' mean, within the bound
    _, state = load_checkpoint(run_dir / "checkpoints" / "round-0001.pt")
    expected = [np.mean(arrays, axis=0) for arrays in zip(*updates.values(), strict=True)]
    largest = max(float(np.abs(a).max()) for arrays in updates.values() for a in arrays)
    bound = quantization_error_bound([1, 1, 1], 1.0, largest)
    error = max(
        float(np.abs(tensor.numpy() - want).max())
        for tensor, want in zip(state.values(), expected, strict=True)
    )
    print(f"unmasked mean vs survivors' mean: {error:.2e} (bound {bound:.2e})")
    assert error <= bound
