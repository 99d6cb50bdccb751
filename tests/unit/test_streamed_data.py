"""Training from a DataLoader over files (data sets larger than memory) and the in-memory path."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

import shared.datasets
from shared.datasets import NpzImages, load_dataset, tensors_of
from shared.errors import DatasetError
from shared.jobs import ModelSpec, TrainingConfig
from shared.models import build_model
from worker.cli import add_worker_arguments
from worker.data import LocalData, StreamedData, load_local_data, loader_options
from worker.settings import WorkerSettings
from worker.training import train

CPU = torch.device("cpu")


def settings(**values: Any) -> WorkerSettings:
    return WorkerSettings(worker_id="w0", **values)


def digits_dataset() -> TensorDataset:
    x, y = tensors_of(load_dataset("digits", "train"))
    return TensorDataset(x, y)


def batch_orders(data: LocalData | StreamedData, seed: int) -> list[list[int]]:
    """The labels of each batch of two epochs, as a fingerprint of the batch order."""
    generator = torch.Generator().manual_seed(seed)
    return [yb.tolist() for _ in range(2) for _, yb in data.epoch(7, 0, generator)]


def write_npz(path: Path, n: int, compressed: bool = False) -> None:
    rng = np.random.default_rng(0)
    save = np.savez_compressed if compressed else np.savez
    save(path, x=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), y=np.arange(n) % 10)


def test_training_through_the_data_loader_lowers_the_loss_on_digits() -> None:
    data = StreamedData(digits_dataset(), CPU, num_workers=0)
    model = build_model(ModelSpec("mlp", (1, 8, 8), 10), seed=0)
    generator = torch.Generator().manual_seed(0)
    config = TrainingConfig(batch_size=32, lr=0.05)

    _, first = train(model, data, config, generator)
    for _ in range(3):
        _, last = train(model, data, config, generator)

    assert last["loss"] < first["loss"] / 2
    assert last["accuracy"] > 0.9


def test_a_seed_gives_the_same_batch_order_streamed_or_in_memory() -> None:
    dataset = digits_dataset()
    streamed = StreamedData(dataset, CPU, num_workers=0)
    in_memory = LocalData(*dataset.tensors)

    orders = [batch_orders(streamed, 5), batch_orders(streamed, 5), batch_orders(in_memory, 5)]

    assert orders[0] == orders[1] == orders[2]
    assert batch_orders(streamed, 6) != orders[0]


def test_loader_worker_processes_serve_the_same_batches_as_the_training_thread() -> None:
    dataset = digits_dataset()
    by_processes = StreamedData(dataset, CPU, num_workers=2)

    assert batch_orders(by_processes, 3) == batch_orders(StreamedData(dataset, CPU, 0), 3)


def test_max_batches_limits_the_batches_read_per_epoch() -> None:
    data = StreamedData(digits_dataset(), CPU, num_workers=0)

    batches = list(data.epoch(10, 3, torch.Generator().manual_seed(0)))

    assert [len(y) for _, y in batches] == [10, 10, 10]


def test_an_uncompressed_npz_file_is_read_a_sample_at_a_time_not_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.npz"
    write_npz(path, 500)
    reads: list[int] = []
    real_pread = shared.datasets.os.pread
    monkeypatch.setattr(
        shared.datasets.os, "pread", lambda fd, n, at: reads.append(n) or real_pread(fd, n, at)
    )
    monkeypatch.setattr(NpzImages, "read_all", lambda self: pytest.fail("read whole"))

    data = load_local_data(settings(data=str(path), in_memory_max_mb=0, loader_workers=0), CPU)
    batches = list(data.epoch(16, 2, torch.Generator().manual_seed(0)))

    assert isinstance(data, StreamedData) and isinstance(data.dataset, NpzImages)
    # One sample to size the set, then two batches of 16 samples of 8x8 bytes; nothing else.
    assert reads == [64] * 33
    assert batches[0][0].shape == (16, 1, 8, 8)
    assert float(batches[0][0].max()) <= 1.0


def test_a_lazily_read_npz_sample_equals_the_whole_array_conversion(tmp_path: Path) -> None:
    path = tmp_path / "site.npz"
    write_npz(path, 30)

    lazy = load_dataset(f"npz:{path}", "train")
    x, y = tensors_of(lazy)

    assert isinstance(lazy, NpzImages)
    assert torch.equal(lazy[17][0], x[17]) and int(lazy[17][1]) == int(y[17])
    assert torch.equal(x, torch.from_numpy(np.load(path)["x"][:, None] / np.float32(255)))


def test_a_compressed_npz_file_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "small.npz"
    write_npz(path, 30, compressed=True)

    assert isinstance(load_dataset(f"npz:{path}", "train"), TensorDataset)


def test_an_image_folder_over_the_memory_limit_decodes_only_the_images_it_trains_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(20):
            Image.new("L", (8, 8), color=i).save(tmp_path / label / f"{i}.png")
    opened: list[str] = []
    real_read = shared.datasets._read_image
    monkeypatch.setattr(
        shared.datasets, "_read_image", lambda p, mode: opened.append(p) or real_read(p, mode)
    )

    data = load_local_data(settings(data=str(tmp_path), in_memory_max_mb=0, loader_workers=0), CPU)
    opened.clear()
    list(data.epoch(4, 1, torch.Generator().manual_seed(0)))

    assert isinstance(data, StreamedData)
    assert data.num_samples == 40
    assert len(opened) == 4


def test_a_small_data_set_goes_to_the_device_whole() -> None:
    data = load_local_data(settings(dataset="digits", loader_workers=0), CPU)

    assert isinstance(data, LocalData)
    assert data.x.shape == (1437, 1, 8, 8)


def test_pinned_memory_is_asked_for_a_cuda_device_only() -> None:
    assert loader_options(torch.device("cuda:0"), 2)["pin_memory"] is True
    assert loader_options(torch.device("cpu"), 2)["pin_memory"] is False
    assert loader_options(torch.device("cpu"), 0)["persistent_workers"] is False
    assert loader_options(torch.device("cpu"), 3) == {
        "num_workers": 3,
        "pin_memory": False,
        "persistent_workers": True,
    }


@pytest.mark.parametrize("missing", ["/nonexistent/scans", "/nonexistent/site.npz", "scans"])
def test_a_missing_data_path_is_named_as_missing_not_as_an_unknown_data_set(missing: str) -> None:
    with pytest.raises(DatasetError, match=f"^no such file or directory: {missing}"):
        load_local_data(settings(data=missing), CPU)


def test_worker_help_describes_every_kind_of_data_it_takes() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)

    text = " ".join(parser.format_help().split())

    for kind in (".npz", "ImageFolder", "torchvision:Name:ROOT", "package.module:function"):
        assert kind in text
    assert "digits" in text and "mnist5k" in text


def test_labels_of_a_data_set_without_targets_are_read_without_keeping_its_inputs() -> None:
    class Scans(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.zeros(1, 4, 4), index % 3

    data = StreamedData(Scans(), CPU, num_workers=0)

    assert data.labels().tolist() == [0, 1, 2, 0, 1]
    assert data.num_samples == 5
