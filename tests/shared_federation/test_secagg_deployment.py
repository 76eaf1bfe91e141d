"""`fedmodel run --secagg` on the shared TLS federation: the coordinator sees masked
vectors only, the unmasked sum is the survivors' when a node dies mid-round, and a run
interrupted mid-round resumes with new keys. Last, `fedmodel run --dp distributed`:
refused by the nodes' default policies, then run on the three shared nodes once their
owners accept it.

Four nodes in the first two: the three shared ones and one the test joins itself (site-t,
site-s), which it pauses or kills mid-round. Every node keeps its plaintext updates in
its own directory (client/secagg_app.py `keep_update`), never sent anywhere; the run
keeps every reply the ServerApp receives (`--record-messages`). The resume test comes
first: a node killed by the other would still look online to the SuperLink for a while.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.secagg_app import UPDATES_DIR
from fedmodel.privacy.audit import audit
from fedmodel.privacy.central import FEDERATION_LEDGER
from fedmodel.privacy.distributed_accounting import owner_segment
from fedmodel.privacy.distributed_ledger import DISTRIBUTED_FINGERPRINT, release_of
from fedmodel.privacy.ledger import PrivacyLedger
from fedmodel.privacy.ledger_chain import COMMITTED
from fedmodel.protocol import REFUSAL_MARKER
from fedmodel.secagg import quantization_error_bound
from server.checkpoint import load_checkpoint
from server.enrollment import load_registry
from server.recording_grid import RECEIVED_DIR, received_content, received_index
from server.superlink import Federation
from tests.federation import (
    background,
    federation_workspace,
    fedmodel,
    join_node,
    wait_for_text,
    wait_until_activated,
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
PAUSED = "site-t"  # the resume test's own node, paused mid-round
COLLECTED = "(collect_masked_vectors): answered"
SHARED_KEYS = "(share_keys): answered"


def secagg_replies(run_dir: Path, key: str) -> list[tuple[int, ConfigRecord]]:
    """(node ID, SecAgg+ record) of each reply the ServerApp received carrying `key`, in
    the order received."""
    received = run_dir / RECEIVED_DIR
    replies = []
    for entry in received_index(received):
        if entry["error"] is not None:
            continue
        record = received_content(received, entry).config_records.get(RECORD_KEY_CONFIGS)
        if record is not None and key in record:
            replies.append((int(str(entry["node_id"])), record))
    return replies


def masked_vectors(run_dir: Path) -> dict[int, np.ndarray]:
    """Each node's masked model vector as the ServerApp received it, flattened, by node ID."""
    vectors = {}
    for node, record in secagg_replies(run_dir, Key.MASKED_PARAMETERS):
        masked = cast(list[bytes], record[Key.MASKED_PARAMETERS])
        # the first part is the node's weight, masked too; the model's weights follow
        parts = [bytes_to_ndarray(part) for part in masked[1:]]
        vectors[node] = np.concatenate([p.ravel() for p in parts])
    return vectors


def node_ids(server: Path, names: Iterable[str]) -> dict[str, int]:
    registry = load_registry(Federation.load(server))
    return {name: int(registry[name]["node_id"]) for name in names}


def serverapps(server: Path) -> list[int]:
    """The ServerApp processes (`flwr-serverapp`) the SuperLink started that still live."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit():
                # stat: "pid (command) state ppid ...", and the command may hold spaces
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(stat[1])
                commands[int(entry.name)] = (entry / "cmdline").read_bytes()
    superlink = int((server / "superlink.pid").read_text())

    def started_by_superlink(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == superlink:
                return True
        return False

    return [
        pid for pid, command in commands.items()
        if b"flwr-serverapp" in command and started_by_superlink(pid)
    ]  # fmt: skip


def test_a_secagg_run_interrupted_mid_round_resumes_with_new_keys_for_that_round(
    shared_federation: SharedFederation, tmp_path: Path
) -> None:
    """Round 2 of 2 is interrupted (Ctrl-C) after every node but site-t has shared its
    keys: site-t's executor is paused after the setup stage, so the round waits for it.
    `fedmodel run --resume` then runs round 2 again on the three shared nodes, which
    never trained it (their replay rule would refuse a round they had): new key pairs,
    so new pairwise masks, and new encrypted shares of new mask seeds."""
    server = shared_federation.server
    run_dir = tmp_path / "resumed"
    names = (*SHARED_SITES, PAUSED)
    node = {name: server.parent / name for name in SHARED_SITES} | {PAUSED: tmp_path / PAUSED}
    with federation_workspace(tmp_path) as space:  # stops the test's runs and its node
        data = write_sites(tmp_path, list(names))[PAUSED]
        wait_until_activated(
            node[PAUSED], join_node(space, server, node[PAUSED], data, SHARED_BUDGET)
        )
        wait_until_online(server, len(names))
        before = {name: (node[name] / "executor.log").read_text().count(SHARED_KEYS)
                  for name in SHARED_SITES}  # fmt: skip
        run = background(
            "run", "--dir", server, "--secagg", "--secagg-shares", "3",
            "--secagg-threshold", "2", "--min-clients", "3", "--rounds", "2",
            "--round-timeout", "120", "--batch-size", "32", "--record-messages",
            "--output", run_dir, log=tmp_path / "interrupted.out",
        )  # fmt: skip
        space.started.append(run)
        wait_for_text(node[PAUSED] / "executor.log", "(setup): answered", run, 240, count=2)
        executor = int((node[PAUSED] / "executor.pid").read_text())
        os.killpg(executor, signal.SIGSTOP)
        try:
            for name in SHARED_SITES:  # round 2's keys are shared; no node has trained it
                log = node[name] / "executor.log"
                wait_for_text(log, SHARED_KEYS, run, 240, count=before[name] + 2)
            assert serverapps(server)  # the run's ServerApp, waiting for site-t
            run.send_signal(signal.SIGINT)
            assert run.wait(timeout=180) == 130, (tmp_path / "interrupted.out").read_text()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(executor, signal.SIGKILL)
        revoked = fedmodel("server", "revoke", PAUSED, "--dir", server)
        assert revoked.returncode == 0, revoked.stderr
        deadline = time.monotonic() + 120  # the stopped run's ServerApp exits
        while serverapps(server):
            assert time.monotonic() < deadline, "the stopped run's ServerApp still runs"
            time.sleep(0.5)
        assert not (run_dir / "checkpoints" / "round-0002.pt").exists()
        resumed = background(
            "run", "--dir", server, "--resume", run_dir, log=tmp_path / "resumed.out"
        )  # fmt: skip
        space.started.append(resumed)
        assert resumed.wait(timeout=400) == 0, (tmp_path / "resumed.out").read_text()

    output = (tmp_path / "resumed.out").read_text()
    # round 1's model is scored by the nodes on the next train message: only now
    assert "Resuming" in output and "round 2/2  nodes 3" in output
    assert "replayed-round" not in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and not summary["stopped_early"]
    assert [row["round"] for row in summary["per_round"]] == [1, 2]
    report = json.loads((run_dir / "secagg.json").read_text())
    assert [(r["round"], r["survivors"]) for r in report["rounds"]] == [(1, 4), (2, 3)]

    ids = node_ids(server, names)
    keys: dict[int, list[bytes]] = {ids[name]: [] for name in names}
    for sender, record in secagg_replies(run_dir, Key.PUBLIC_KEY_1):
        keys[sender].append(cast(bytes, record[Key.PUBLIC_KEY_1]))
        keys[sender].append(cast(bytes, record[Key.PUBLIC_KEY_2]))
    shares: dict[int, list[bytes]] = {ids[name]: [] for name in names}
    for sender, record in secagg_replies(run_dir, Key.CIPHERTEXT_LIST):
        shares[sender].extend(cast(list[bytes], record[Key.CIPHERTEXT_LIST]))
    for name in SHARED_SITES:
        # setup replies: round 1, interrupted round 2, resumed round 2: two keys each
        sent = keys[ids[name]]
        assert len(sent) == 6 and len(set(sent)) == 6, name
        # share-keys replies: two encrypted shares each (3 shares) in each of the three
        assert len(shares[ids[name]]) == 6 and len(set(shares[ids[name]])) == 6, name
    # masked vectors: round 1 from all four, resumed round 2 from the three shared nodes
    received = Counter(sender for sender, _ in secagg_replies(run_dir, Key.MASKED_PARAMETERS))
    assert received == {ids[name]: 1 if name == PAUSED else 2 for name in names}
    run_uid = json.loads((run_dir / "config.json").read_text())["run-uid"]
    for name in SHARED_SITES:  # each owner trained each round once, in its own ledger
        entries = PrivacyLedger(node[name] / "privacy-ledger.sqlite").entries()
        trained = [e.server_round for e in entries if (e.run_id, e.status) == (run_uid, "pending")]
        assert trained == [1, 2], (name, trained)


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
            dropped = join_node(space, server, nodes[DROPPED], data, SHARED_BUDGET)
            for node in nodes.values():
                (node / UPDATES_DIR).mkdir(parents=True, exist_ok=True)
            wait_until_activated(nodes[DROPPED], dropped)
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
    ids = node_ids(server, nodes)
    vectors = masked_vectors(run_dir)
    assert set(vectors) == {ids[name] for name in SHARED_SITES}
    pairs = [(vectors[ids[name]], np.concatenate([a.ravel() for a in updates[name]]))
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


def set_policy(nodes: Iterable[Path], *options: str) -> None:
    """`fedmodel client policy` on each node, running: it applies from the next message."""
    for node in nodes:
        changed = fedmodel("client", "policy", "--dir", node, *options)
        assert changed.returncode == 0, changed.stderr


def test_distributed_dp_run_is_refused_by_default_and_shows_the_coordinator_noisy_masked_residues(
    shared_federation: SharedFederation, tmp_path: Path
) -> None:
    """`fedmodel run --dp distributed` on the three shared nodes. With their default
    policies each refuses it at once, and the operator reads why, by node name. Once their
    owners accept it (`fedmodel client policy --accept-distributed-dp`), each node clips,
    encodes and noises its update (OS CSPRNG) before SecAgg+ masks it: the coordinator
    receives residues modulo 2**bits that look uniform and unlike the node's model, the
    release is in the run's federation ledger and `fedmodel audit` recomputes it, each
    owner's ledger paid for the round at the noise shares its policy counts on, and the
    nodes score the model it trained. Nodes the earlier tests left enrolled (killed or
    revoked) are revoked first, so that no round waits for them."""
    server = shared_federation.server
    nodes = {name: server.parent / name for name in SHARED_SITES}
    for name, entry in load_registry(Federation.load(server)).items():
        if name not in SHARED_SITES and entry["status"] != "revoked":
            revoked = fedmodel("server", "revoke", name, "--dir", server)
            assert revoked.returncode == 0, revoked.stderr
    bits = 18
    distributed = (
        "run", "--dir", server, "--dp", "distributed", "--distributed-bits", str(bits),
        "--distributed-noise", "0.05",
        "--secagg-shares", "3", "--secagg-threshold", "2", "--min-clients", "3",
        "--rounds", "1", "--round-timeout", "120", "--batch-size", "32",
    )  # fmt: skip
    started = time.monotonic()
    refused = fedmodel(*distributed, "--output", tmp_path / "refused", timeout=300)
    print(f"refused run: {time.monotonic() - started:.0f} s")
    assert refused.returncode != 0
    for name in SHARED_SITES:  # in one line, by name, with the owner's option
        lines = [
            line for line in refused.stdout.splitlines() if f"{REFUSAL_MARKER} {name}:" in line
        ]
        assert lines, refused.stdout
        assert all("has not accepted" in line and "--accept-distributed-dp" in line
                   for line in lines), lines  # fmt: skip

    run_dir = tmp_path / "distributed"
    try:
        # noise 0.05 lets one round visibly train, and costs each record about a thousand
        # epsilon counting 3 noise shares: these owners grant it for this run only
        set_policy(
            nodes.values(), "--accept-distributed-dp", "--distributed-noise-shares", "3",
            "--budget-epsilon", "20000",
        )  # fmt: skip
        for node in nodes.values():
            (node / UPDATES_DIR).mkdir(exist_ok=True)
        started = time.monotonic()
        ran = fedmodel(
            *distributed, "--record-messages", "--output", run_dir, timeout=400
        )  # fmt: skip
        print(f"distributed run, 1 round on 3 nodes: {time.monotonic() - started:.0f} s")
        assert ran.returncode == 0, ran.stdout + ran.stderr
        updates = {name: kept_update(node) for name, node in nodes.items()}
    finally:  # the shared nodes go back to their default policy and keep nothing
        set_policy(
            nodes.values(), "--refuse-distributed-dp", "--distributed-noise-shares", "1",
            "--budget-epsilon", str(SHARED_BUDGET),
        )  # fmt: skip
        for node in nodes.values():
            shutil.rmtree(node / UPDATES_DIR, ignore_errors=True)
    assert "distributed DP" in ran.stdout
    assert "Client-level epsilon (whole clients, distributed discrete Gaussian" in ran.stdout

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and not summary["stopped_early"]
    report = json.loads((run_dir / "secagg.json").read_text())
    assert report["protocol"]["modulus_range"] == 2**bits
    assert [(r["sampled"], r["survivors"]) for r in report["rounds"]] == [(3, 3)]

    # The coordinator's view: one masked vector per node, residues modulo 2**bits that
    # look uniform. A node's unmasked residues (its small noisy integers) would lie within
    # a quarter of the modulus of 0 nearly everywhere; a uniform vector, half the time
    # (1,024 coordinates: within 0.1 of it at 6 standard errors).
    ids = node_ids(server, SHARED_SITES)
    vectors = masked_vectors(run_dir)
    assert set(vectors) == set(ids.values())
    pooled_masked, pooled_update = [], []
    for name, node in ids.items():
        masked = vectors[node]
        update = np.concatenate([a.ravel() for a in updates[name]])
        assert masked.dtype.kind in "iu" and masked.size >= update.size
        assert masked.min() >= 0 and masked.max() < 2**bits
        near_zero = float(np.mean(np.minimum(masked, 2**bits - masked) < 2**bits / 4))
        print(f"{name}: {near_zero:.3f} of its masked residues within 2**bits/4 of 0")
        assert abs(near_zero - 0.5) < 0.1, name
        pooled_masked.append(masked[: update.size].astype(np.float64))
        pooled_update.append(update.astype(np.float64))
    r = float(np.corrcoef(np.concatenate(pooled_masked), np.concatenate(pooled_update))[0, 1])
    print(f"masked residues vs the nodes' trained weights: r = {r:.4f}")
    assert abs(r) < 0.05

    # The release is in the run's federation ledger; the audit recomputes it on its own
    audited = fedmodel("audit", run_dir, timeout=120)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert "Distributed DP (client-level, against the coordinator): 1 releases" in audited.stdout
    found = audit(run_dir)
    assert found.ok and found.distributed is not None and found.distributed.releases == 1
    recorded = found.distributed.recorded_epsilon
    assert found.distributed.recomputed_epsilon == pytest.approx(recorded, rel=0.005)
    assert summary["client_level_dp"]["epsilon"] == pytest.approx(recorded)
    print(f"client-level epsilon {recorded:.3f} recorded and recomputed")
    run_uid = json.loads((run_dir / "config.json").read_text())["run-uid"]
    # Each owner paid for the round before its update left, counting its own policy's 3
    # noise shares on the mechanism the coordinator recorded; its ledger audits clean.
    (release,) = [
        release_of(entry)
        for entry in PrivacyLedger(run_dir / FEDERATION_LEDGER).entries()
        if entry.fingerprint == DISTRIBUTED_FINGERPRINT and entry.status == COMMITTED
    ]
    charged = owner_segment(release.parameters, 3)
    for name, node in nodes.items():
        path = node / "privacy-ledger.sqlite"
        mine = [entry for entry in PrivacyLedger(path).entries() if entry.run_id == run_uid]
        assert [(e.server_round, e.status) for e in mine] == [(1, "pending"), (1, COMMITTED)]
        assert mine[-1].segment == pytest.approx(charged)
        owner = audit(path)
        assert owner.ok, owner.all_problems()
        print(f"{name}: charged epsilon {mine[-1].epsilon:.1f} for the round")

    auroc = summary["per_round"][-1]["auroc"]  # the nodes' scores on their hold-outs
    print(f"AUROC on the nodes' hold-outs: {summary['initial']['auroc']:.3f} -> {auroc:.3f}")
    assert 0 < auroc < 1 and auroc > summary["initial"]["auroc"]  # noise 0.05: it trains
