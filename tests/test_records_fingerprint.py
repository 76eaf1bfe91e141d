"""A deployed node's ledger key follows its records, not the federation's encoding of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Context, RecordDict

from client.local_data import records_fingerprint
from fedmodel.data import load_table, table_statistics
from fedmodel.privacy.ledger import dataset_fingerprint


def node(path: Path, label: str = "death") -> Context:
    config: dict[str, bool | float | int | str] = {"data-path": str(path), "label": label}
    return Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})


def write_table(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    rows = ["age,creatinine,death"]
    rows += [
        f"{rng.integers(40, 90)},{rng.normal(1, 0.2):.3f},{rng.integers(0, 2)}" for _ in range(50)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_same_file_keeps_its_fingerprint_when_the_federation_changes(tmp_path: Path) -> None:
    mine = write_table(tmp_path / "mine.csv", 0)
    other = write_table(tmp_path / "other.csv", 1)
    alone = table_statistics(mine, "death")
    with_other = alone.merge(table_statistics(other, "death"))  # another node joined
    encoded = [load_table(mine, "death", stats).tensors() for stats in (alone, with_other)]
    tensor_keys = {dataset_fingerprint(x.numpy(), y.numpy()) for x, y in encoded}
    assert len(tensor_keys) == 2  # keyed by its encoding, the budget would restart
    assert records_fingerprint(node(mine)) == records_fingerprint(node(mine))
    assert records_fingerprint(node(mine)) != records_fingerprint(node(other))
    assert records_fingerprint(node(mine)) != records_fingerprint(node(mine, label="age"))


def test_an_edited_file_is_a_new_dataset_and_simulation_has_no_file(tmp_path: Path) -> None:
    path = write_table(tmp_path / "site.csv", 0)
    before = records_fingerprint(node(path))
    path.write_text(path.read_text().replace("\n4", "\n5", 1))
    assert records_fingerprint(node(path)) != before
    simulated = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    assert records_fingerprint(simulated) is None
