import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fedmodel.config import RunConfig, Section
from fedmodel.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_defaults_equal_the_config_dataclass() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_run_config()


def test_pyproject_is_a_flower_app_without_federations() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "server.app:app",
        "clientapp": "client.app:app",
    }
    assert "federations" not in pyproject["tool"]["flwr"]
    assert "_" not in pyproject["project"]["name"]


def test_run_config_round_trips_through_flower_form() -> None:
    config = RunConfig(clients=3, rounds=7, dp="off", epsilon=2.5, partition="dirichlet")
    assert RunConfig.from_run_config(config.to_run_config()) == config
    assert set(config.to_run_config()) == {f.name.replace("_", "-") for f in fields(RunConfig)}


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"epsilon": 0.0}, "--epsilon"),
        ({"epsilon": -1.0}, "--epsilon"),
        ({"epsilon": float("nan")}, "--epsilon"),
        ({"delta": 0.0}, "--delta"),
        ({"delta": 1.0}, "--delta"),
        ({"clients": 0}, "--clients"),
        ({"rounds": 0}, "--rounds"),
        ({"batch_size": 0}, "--batch-size"),
        ({"partition": "random"}, "--partition"),
        ({"server_lr": 0.0}, "--server-lr"),
        ({"server_lr": float("inf")}, "--server-lr"),
        ({"server_momentum": 1.0}, "--server-momentum"),
        ({"server_momentum": -0.1}, "--server-momentum"),
    ],
)
def test_invalid_values_name_the_option(change: dict[str, object], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        RunConfig(**change)  # type: ignore[arg-type]


def test_every_key_declares_a_section_and_a_one_line_help() -> None:
    keys = RunConfig.config_keys()
    assert list(keys) == [f.name for f in fields(RunConfig)]
    for spec in keys.values():
        assert isinstance(spec.section, Section), spec.name
        assert spec.help and "\n" not in spec.help, spec.name
        assert spec.default == getattr(RunConfig(), spec.name)


def test_choice_keys_are_literals_whose_values_include_the_default() -> None:
    choices = {name: spec.choices for name, spec in RunConfig.config_keys().items()}
    assert choices["dp"] == ("off", "sample", "client", "both", "distributed")
    assert choices["partition"] == ("iid", "dirichlet", "shard", "pathological")
    assert {"model", "aggregator", "evaluation", "attack", "task"} < {
        n for n in choices if choices[n]
    }
    for name, values in choices.items():
        assert not values or getattr(RunConfig(), name) in values


def test_run_config_values_read_back_with_the_keys_type() -> None:
    config = RunConfig.from_run_config({"rounds": "3", "secagg": "false", "dp": "off"})
    assert (config.rounds, config.secagg, config.dp) == (3, False, "off")
