"""Tests of a worker's local data: --data paths and specs, --dataset shares, and the rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared.errors import ConfigError, DatasetError
from worker.data import data_spec, load_local_data
from worker.settings import WorkerSettings

CPU = torch.device("cpu")
DIGITS_TRAIN = 1437


def settings(**values: Any) -> WorkerSettings:
    return WorkerSettings(worker_id="w0", **values)


def test_a_path_ending_in_npz_is_read_as_an_npz_file() -> None:
    assert data_spec("/data/site-a.npz") == "npz:/data/site-a.npz"


def test_an_existing_directory_is_read_as_an_image_folder(tmp_path: Path) -> None:
    assert data_spec(str(tmp_path)) == f"imagefolder:{tmp_path}"


def test_any_other_data_value_is_taken_as_a_data_set_spec() -> None:
    assert data_spec("torchvision:MNIST:/data/mnist") == "torchvision:MNIST:/data/mnist"
    assert data_spec("mypackage.data:load") == "mypackage.data:load"


def test_an_npz_file_with_a_train_split_loads_onto_the_cpu_with_a_channel_axis(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "site.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, size=(12, 6, 5), dtype=np.uint8),
        y_train=np.arange(12) % 3,
        x_test=np.zeros((2, 6, 5), dtype=np.uint8),
        y_test=np.zeros(2, dtype=np.int64),
    )

    data = load_local_data(settings(data=str(path)), CPU)

    assert data.x.shape == (12, 1, 6, 5)
    assert data.y.shape == (12,)
    assert (data.x.device, data.y.device) == (CPU, CPU)
    assert (data.x.dtype, data.y.dtype) == (torch.float32, torch.int64)
    assert data.x.min().item() >= 0.0
    assert data.x.max().item() <= 1.0
    assert data.num_samples == 12


def test_an_npz_file_of_x_and_y_serves_them_as_the_train_split(tmp_path: Path) -> None:
    path = tmp_path / "site.npz"
    np.savez(path, x=np.full((5, 4, 4), 0.25, dtype=np.float32), y=np.array([0, 1, 0, 1, 2]))

    data = load_local_data(settings(data=str(path)), CPU)

    assert data.x.shape == (5, 1, 4, 4)
    assert data.x.max().item() == pytest.approx(0.25)
    assert data.y.tolist() == [0, 1, 0, 1, 2]


def test_channels_last_npz_images_become_channels_first(tmp_path: Path) -> None:
    path = tmp_path / "rgb.npz"
    np.savez(path, x=np.zeros((3, 8, 8, 3), dtype=np.uint8), y=np.array([0, 1, 2]))

    data = load_local_data(settings(data=str(path)), CPU)

    assert data.x.shape == (3, 3, 8, 8)


def test_an_npz_file_without_the_expected_arrays_is_a_dataset_error(tmp_path: Path) -> None:
    path = tmp_path / "odd.npz"
    np.savez(path, images=np.zeros((3, 8, 8), dtype=np.uint8), labels=np.zeros(3, dtype=np.int64))

    with pytest.raises(DatasetError, match="x_train"):
        load_local_data(settings(data=str(path)), CPU)


def test_an_iid_share_of_two_of_digits_is_half_the_train_set() -> None:
    data = load_local_data(
        settings(dataset="digits", partition="iid", num_partitions=2, partition_index=1), CPU
    )

    assert abs(data.num_samples - DIGITS_TRAIN / 2) <= 1
    assert data.x.shape[1:] == (1, 8, 8)


def test_shares_drawn_with_the_same_seed_are_disjoint_and_cover_the_train_set() -> None:
    shares = [
        load_local_data(settings(dataset="digits", num_partitions=3, partition_index=i), CPU)
        for i in range(3)
    ]

    rows = [{row.numpy().tobytes() for row in share.x} for share in shares]

    assert sum(len(r) for r in rows) == DIGITS_TRAIN
    assert len(rows[0] | rows[1] | rows[2]) == DIGITS_TRAIN


def test_one_share_of_one_is_the_whole_train_set() -> None:
    data = load_local_data(settings(dataset="digits"), CPU)

    assert data.num_samples == DIGITS_TRAIN


@pytest.mark.parametrize(
    "values",
    [{}, {"data": "site.npz", "dataset": "digits"}],
    ids=["neither", "both"],
)
def test_a_worker_needs_exactly_one_of_data_and_dataset(values: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="exactly one of"):
        load_local_data(settings(**values), CPU)


@pytest.mark.parametrize("index", [2, 5, -1])
def test_a_partition_index_outside_the_partitions_is_a_config_error(index: int) -> None:
    values = {"dataset": "digits", "num_partitions": 2, "partition_index": index}

    with pytest.raises(ConfigError, match="partition-index"):
        load_local_data(settings(**values), CPU)


def test_an_unknown_partition_scheme_is_a_config_error() -> None:
    values = {"dataset": "digits", "num_partitions": 2, "partition": "random"}

    with pytest.raises(ConfigError, match="random"):
        load_local_data(settings(**values), CPU)


def test_every_simulated_worker_cuts_the_same_split_whatever_its_own_seed() -> None:
    shares = [
        load_local_data(
            WorkerSettings(
                worker_id=f"w{i}", dataset="digits", num_partitions=4, partition_index=i, seed=i
            ),
            torch.device("cpu"),
        )
        for i in range(4)
    ]

    assert sum(share.num_samples for share in shares) == 1437
    rows = torch.cat([share.x.reshape(len(share.y), -1) for share in shares])
    assert len(torch.unique(rows, dim=0)) == len(torch.unique(load_all_digits(), dim=0))


def load_all_digits() -> torch.Tensor:
    from shared.datasets import load_dataset, tensors_of

    x, _ = tensors_of(load_dataset("digits", "train"))
    return x.reshape(len(x), -1)
