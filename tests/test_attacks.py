import pytest
import torch

from fedmodel.config import RunConfig
from fedmodel.errors import ConfigError
from simulations.attacks import is_attacker, poison

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
