"""Tests of device selection; CUDA and MPS availability are faked, no GPU is touched."""

from __future__ import annotations

import pytest
import torch

from shared.errors import ConfigError
from worker.device import select_device


@pytest.fixture
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with neither CUDA nor MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def one_cuda_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that reports one CUDA GPU (nothing is ever allocated on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.usefixtures("no_accelerator")
def test_auto_is_the_cpu_without_cuda_or_mps() -> None:
    assert select_device("auto") == torch.device("cpu")


@pytest.mark.usefixtures("one_cuda_gpu")
def test_auto_is_cuda_when_cuda_is_available() -> None:
    assert select_device("auto") == torch.device("cuda")


def test_auto_is_mps_when_only_mps_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)

    assert select_device("auto") == torch.device("mps")


@pytest.mark.usefixtures("one_cuda_gpu")
def test_an_explicit_cpu_is_the_cpu_even_with_cuda_available() -> None:
    assert select_device("cpu") == torch.device("cpu")


@pytest.mark.usefixtures("one_cuda_gpu")
def test_an_explicit_cuda_index_within_the_gpus_present_is_that_gpu() -> None:
    assert select_device("cuda:0") == torch.device("cuda", 0)


@pytest.mark.usefixtures("no_accelerator")
def test_cuda_without_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        select_device("cuda")


@pytest.mark.usefixtures("one_cuda_gpu")
def test_a_cuda_index_beyond_the_gpus_present_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="only 1 GPUs"):
        select_device("cuda:3")


@pytest.mark.usefixtures("no_accelerator")
def test_mps_without_mps_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="MPS is not available"):
        select_device("mps")


@pytest.mark.parametrize("name", ["gpu0", "", "CPU", "cuda:x", "toaster"])
def test_a_device_name_torch_does_not_know_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown device"):
        select_device(name)


@pytest.mark.parametrize("name", ["meta", "vulkan"])
def test_a_torch_device_type_fedq_cannot_train_on_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="fedq trains on"):
        select_device(name)
