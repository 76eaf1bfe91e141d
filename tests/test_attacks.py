import pytest
import torch

from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError
from simulations.attacks import is_attacker, poison, simulated_attack_mod

GLOBAL = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
LOCAL = {"w": torch.tensor([1.5, 1.0]), "b": torch.tensor([0.5])}


def test_sign_flip_reverses_the_update() -> None:
    sent = poison(GLOBAL, LOCAL, "sign-flip", seed=0)
    torch.testing.assert_close(sent["w"], torch.tensor([0.5, 3.0]))
    torch.testing.assert_close(sent["b"], GLOBAL["b"])


def test_scaled_boosts_the_update_tenfold() -> None:
    sent = poison(GLOBAL, LOCAL, "scaled", seed=0)
    torch.testing.assert_close(sent["w"], torch.tensor([6.0, -8.0]))


def test_gaussian_adds_noise_with_std_100() -> None:
    big = {"w": torch.zeros(20_000)}
    sent = poison(big, big, "gaussian", seed=1)
    assert 95 < float(sent["w"].std()) < 105
    assert not torch.equal(sent["w"], poison(big, big, "gaussian", seed=2)["w"])


def test_nan_attack_sends_only_nan() -> None:
    assert torch.isnan(poison(GLOBAL, LOCAL, "nan", seed=0)["w"]).all()


def test_attackers_are_the_first_fraction_of_partitions() -> None:
    assert [is_attacker(p, 10, 0.2) for p in range(10)] == [True, True] + [False] * 8
    assert not any(is_attacker(p, 10, 0.0) for p in range(10))


def test_bad_attack_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--attack must be one of"):
        RunConfig(attack="flood")
    with pytest.raises(ConfigError, match="--attackers"):
        RunConfig(attack="nan", attackers=1.5)


def test_only_the_simulations_client_app_carries_the_attack_mod() -> None:
    """A coordinator cannot ask a deployed node to poison its reply: the mod is not there."""
    from client.app import app as deployed_client_app
    from simulations.apps import client_app as simulated_client_app

    assert simulated_attack_mod not in deployed_client_app._mods
    assert simulated_attack_mod in simulated_client_app._mods
