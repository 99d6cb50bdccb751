"""A worker's local data: a path on disk, a data set spec, or a partition of a built-in one."""

from __future__ import annotations

import os

import torch

from shared.datasets import load_dataset, partition, tensors_of
from shared.errors import ConfigError
from worker.service import LocalData
from worker.settings import WorkerSettings


def data_spec(path: str) -> str:
    """Turn a --data value into a data set spec: .npz files and ImageFolder directories by path."""
    if path.endswith(".npz"):
        return f"npz:{path}"
    if os.path.isdir(path):
        return f"imagefolder:{path}"
    return path


def load_local_data(settings: WorkerSettings, device: torch.device) -> LocalData:
    """Load the worker's training examples onto its device."""
    if bool(settings.data) == bool(settings.dataset):
        raise ConfigError("give the worker exactly one of --data PATH or --dataset NAME")
    if settings.data:
        x, y = tensors_of(load_dataset(data_spec(settings.data), "train"))
    else:
        x, y = tensors_of(load_dataset(settings.dataset, "train"))
        if not 0 <= settings.partition_index < settings.num_partitions:
            raise ConfigError("--partition-index must be in 0 .. --num-partitions - 1")
        parts = partition(
            y.numpy(), settings.num_partitions, settings.partition, settings.partition_seed
        )
        index = torch.from_numpy(parts[settings.partition_index])
        x, y = x[index], y[index]
    if len(y) == 0:
        raise ConfigError("the worker's local data set is empty")
    return LocalData(x.to(device), y.to(device))
