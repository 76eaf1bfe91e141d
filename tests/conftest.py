"""Shared fixtures: the real flchain data and an independent epsilon oracle."""

from __future__ import annotations

import logging

import pytest

from fedmodel.data import TabularData


@pytest.fixture(scope="session")
def flchain() -> tuple[TabularData, TabularData]:
    from simulations.medical import load_flchain

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
