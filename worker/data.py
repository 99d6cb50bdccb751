"""A worker's local data: loading it (a path, a data set spec, or a share of a built-in set) and
serving it in batches, whole from tensors on the device (small sets) or through a DataLoader."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from shared.datasets import (
    BUILTIN_SPLITS,
    estimated_bytes,
    labels_of,
    load_dataset,
    partition,
    tensors_of,
)
from shared.errors import ConfigError, DatasetError
from shared.references import requested_modules
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
# Spec kinds that name a file or folder after their colon, and the rest of the spec forms.
_PATH_KINDS = ("npz:", "imagefolder:", "torchvision:")


@dataclass(frozen=True)
class LocalData:
    """Training examples held whole on the worker's device: a batch is one indexing, with no
    collation or copy; for sets under the worker's in_memory_max_mb."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def num_samples(self) -> int:
        """How many examples the worker holds."""
        return int(self.y.shape[0])

    def labels(self) -> torch.Tensor:
        """Every label (on the device)."""
        return self.y

    def sample(self, count: int) -> Batch:
        """The first `count` examples, on the device."""
        return self.x[:count], self.y[:count]

    def epoch(
        self, batch_size: int, max_batches: int, generator: torch.Generator
    ) -> Iterator[Batch]:
        """One shuffled pass: batches in the order of one randperm drawn from `generator`."""
        # The permutation is drawn on the CPU so that it is the same for a seed on every device.
        order = torch.randperm(self.num_samples, generator=generator).to(self.x.device)
        for start in _batch_starts(self.num_samples, batch_size, max_batches):
            idx = order[start : start + batch_size]
            yield self.x[idx], self.y[idx]


class StreamedData:
    """Training examples read from a Dataset in batches by a DataLoader: `num_workers` processes
    read and decode files while the model trains, and only a few batches are in memory at once.
    The batch order for a seed is the in-memory path's (one randperm per epoch)."""

    def __init__(self, dataset: Dataset[Any], device: torch.device, num_workers: int) -> None:
        self.dataset = dataset
        self.device = device
        self.targets = labels_of(dataset)  # on the CPU: labels are small even when images are not
        self._batches = _EpochBatches(len(self.targets))
        self._loader = DataLoader(
            dataset, batch_sampler=self._batches, **loader_options(device, num_workers)
        )

    @property
    def num_samples(self) -> int:
        """How many examples the worker holds."""
        return len(self.targets)

    def labels(self) -> torch.Tensor:
        """Every label (on the CPU)."""
        return self.targets

    def sample(self, count: int) -> Batch:
        """The first `count` examples, read in this process and moved to the device."""
        xb, yb = default_collate([self.dataset[i] for i in range(min(count, self.num_samples))])
        return xb.to(self.device), yb.to(self.device)

    def epoch(
        self, batch_size: int, max_batches: int, generator: torch.Generator
    ) -> Iterator[Batch]:
        """One shuffled pass: the sampler draws its randperm from `generator` in this process."""
        self._batches.plan(batch_size, max_batches, generator)
        # From pinned memory a copy to the GPU can overlap with compute.
        pinned = self._loader.pin_memory
        for xb, yb in self._loader:
            yield xb.to(self.device, non_blocking=pinned), yb.to(self.device, non_blocking=pinned)


TrainingData = LocalData | StreamedData


def loader_options(device: torch.device, num_workers: int) -> dict[str, Any]:
    """DataLoader arguments for a device: pinned host memory only for CUDA (faster, async
    copies); worker processes kept between epochs and tasks, since starting them is slow."""
    return {
        "num_workers": num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": num_workers > 0,
    }


class _EpochBatches(Sampler[list[int]]):
    """Index batches of one epoch, planned before each: size, limit and the generator."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.batch_size, self.max_batches = 1, 0
        self.generator = torch.Generator()

    def plan(self, batch_size: int, max_batches: int, generator: torch.Generator) -> None:
        """Set what the next pass draws (the DataLoader calls __iter__ in this process)."""
        self.batch_size, self.max_batches, self.generator = batch_size, max_batches, generator

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=self.generator).tolist()
        for start in _batch_starts(self.size, self.batch_size, self.max_batches):
            yield order[start : start + self.batch_size]

    def __len__(self) -> int:
        return len(_batch_starts(self.size, self.batch_size, self.max_batches))


def _batch_starts(size: int, batch_size: int, max_batches: int) -> range:
    starts = range(0, size, batch_size)
    return starts[:max_batches] if max_batches else starts


def data_spec(path: str) -> str:
    """Turn a --data value into a data set spec: .npz files and ImageFolder directories by path.

    A value that is neither a spec nor an existing path is reported as a missing path.
    """
    if path.endswith(".npz") and not path.startswith(_PATH_KINDS):
        return f"npz:{path}"  # load_dataset says when it is missing
    if os.path.isdir(path):
        return f"imagefolder:{path}"
    if path in BUILTIN_SPLITS or path.startswith(_PATH_KINDS) or _is_factory(path):
        return path
    hint = "" if os.sep in path else f" (nor a built-in data set: {', '.join(BUILTIN_SPLITS)})"
    raise DatasetError(f"no such file or directory: {path}{hint}")


def _is_factory(value: str) -> bool:
    """Whether a value reads as 'package.module:function' (no path separator in it)."""
    module, _, function = value.partition(":")
    return bool(module and function) and "/" not in value and os.sep not in value


def load_local_data(settings: WorkerSettings, device: torch.device) -> TrainingData:
    """The worker's training examples: whole on its device when they take at most
    in_memory_max_mb as tensors, else read in batches from the files through a DataLoader."""
    if bool(settings.data) == bool(settings.dataset):
        raise ConfigError("give the worker exactly one of --data PATH or --dataset NAME")
    if settings.loader_workers < 0 or not settings.in_memory_max_mb >= 0:
        raise ConfigError("--loader-workers and --in-memory-max-mb must be 0 or more")
    # The worker's own data reference is its operator's choice, not a message's: its module is
    # allowed on top of allowed_modules (which a task's model is held to).
    spec = data_spec(settings.data) if settings.data else settings.dataset
    allowed = settings.allowed_modules + requested_modules(spec)
    dataset = load_dataset(spec, "train", allowed_modules=allowed)
    if not settings.data:
        if not 0 <= settings.partition_index < settings.num_partitions:
            raise ConfigError("--partition-index must be in 0 .. --num-partitions - 1")
        parts = partition(
            labels_of(dataset).numpy(),
            settings.num_partitions,
            settings.partition,
            settings.partition_seed,
        )
        dataset = Subset(dataset, parts[settings.partition_index].tolist())
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ConfigError("the worker's local data set is empty")
    size = estimated_bytes(dataset)
    if size <= settings.in_memory_max_mb * 2**20:
        x, y = tensors_of(dataset)
        return LocalData(x.to(device), y.to(device))
    logger.info(
        "local data: %d samples, %.0f MB as tensors (over in_memory_max_mb %g): "
        "read in batches by %d loader processes",
        len(dataset),  # type: ignore[arg-type]
        size / 2**20,
        settings.in_memory_max_mb,
        settings.loader_workers,
    )
    return StreamedData(dataset, device, settings.loader_workers)
