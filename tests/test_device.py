"""The GPU path: `--device auto|cpu|cuda[:N]` and `--gpus-per-client`, checked on the
machines CI has (no GPU): auto falls back to the CPU, and asking for a GPU that is not
there is one clear line before any engine starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmodel.config import RunConfig
from fedmodel.data import TabularData, make_loader
from fedmodel.errors import ConfigError
from fedmodel.training import select_device
from simulations.runner import check_device, federation_config

FEDMODEL = str(Path(sys.executable).parent / "fedmodel")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@no_gpu
def test_auto_device_is_the_cpu_without_cuda() -> None:
    assert select_device("auto") == torch.device("cpu")
    check_device(RunConfig(device="auto"))  # no error: the CPU path


@no_gpu
def test_unavailable_cuda_is_one_clear_error() -> None:
    with pytest.raises(ConfigError) as error:
        select_device("cuda")
    assert str(error.value) == (
        "--device cuda: this machine has no CUDA device; use --device auto or cpu"
    )


def test_a_missing_cuda_index_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="^--device cuda:99: this machine has"):
        select_device("cuda:99")


@no_gpu
def test_gpus_per_client_without_a_gpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="--gpus-per-client 0.5 needs a CUDA device"):
        check_device(RunConfig(gpus_per_client=0.5))


def test_device_names_are_validated() -> None:
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda or cuda:N"):
        RunConfig(device="gpu")
    with pytest.raises(ConfigError, match="--gpus-per-client must be 0"):
        RunConfig(gpus_per_client=-0.5)


def test_ray_clients_get_their_share_of_a_gpu_only_when_asked() -> None:
    assert federation_config(RunConfig(clients=4)) == (
        "num-supernodes=4 client-resources-num-cpus=1"
    )
    assert federation_config(RunConfig(clients=4, gpus_per_client=0.25)) == (
        "num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0.25"
    )


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_loader_batches_are_cut_on_the_device(device: str) -> None:
    data = TabularData(
        torch.randn(10, 3).numpy(), (torch.arange(10) % 2).float().numpy(), ("a", "b", "c")
    )
    features, labels = next(
        iter(make_loader(data.dataset(), 4, seed=0, device=torch.device(device)))
    )
    assert features.device.type == device and labels.device.type == device


@no_gpu
def test_simulate_refuses_a_missing_gpu_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [FEDMODEL, "simulate", "medical", "--device", "cuda", "--output", "run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --device cuda: this machine has no CUDA device; use --device auto or cpu"
    ]
    assert not (tmp_path / "run").exists()  # refused before anything was written
