"""Tests of the data registry: bundled digits, npz and image folders, user data, shapes, tensors."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from shared.datasets import dataset_shape, load_dataset, tensors_of
from shared.errors import DatasetError, RegistryError


def test_mnist5k_has_4000_training_and_1000_test_digits_of_ten_classes() -> None:
    train, test = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")

    assert (len(train), len(test)) == (4000, 1000)  # type: ignore[arg-type]
    assert dataset_shape(train) == ((1, 28, 28), 10)
    assert dataset_shape(test) == ((1, 28, 28), 10)


def test_mnist5k_is_float32_normalised_with_the_mnist_statistics() -> None:
    x, y = tensors_of(load_dataset("mnist5k", "train"))

    assert (x.dtype, y.dtype) == (torch.float32, torch.int64)
    assert x.min().item() == pytest.approx((0 - 0.1307) / 0.3081, abs=1e-5)
    assert abs(x.mean().item()) < 0.1
    assert abs(x.std().item() - 1) < 0.1


def test_mnist5k_loads_the_same_split_every_time() -> None:
    first_x, first_y = tensors_of(load_dataset("mnist5k", "test"))
    second_x, second_y = tensors_of(load_dataset("mnist5k", "test"))

    assert torch.equal(first_x, second_x)
    assert torch.equal(first_y, second_y)


def test_mnist5k_train_and_test_share_no_digit() -> None:
    train_x, _ = tensors_of(load_dataset("mnist5k", "train"))
    test_x, _ = tensors_of(load_dataset("mnist5k", "test"))

    train_rows = {row.tobytes() for row in train_x.numpy()}

    assert not any(row.tobytes() in train_rows for row in test_x.numpy())


def test_changing_a_loaded_dataset_does_not_change_the_next_load() -> None:
    x, _ = tensors_of(load_dataset("digits", "train"))
    x.fill_(-5.0)

    again, _ = tensors_of(load_dataset("digits", "train"))

    assert again.min().item() >= 0.0


def test_digits_has_1437_training_and_360_test_images_in_0_to_1() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    x, y = tensors_of(train)

    assert (len(train), len(test)) == (1437, 360)  # type: ignore[arg-type]
    assert dataset_shape(test) == ((1, 8, 8), 10)
    assert x.min().item() == 0.0
    assert x.max().item() == 1.0
    assert y.dtype == torch.int64


def test_an_unknown_split_is_refused() -> None:
    with pytest.raises(DatasetError, match="split"):
        load_dataset("digits", "validation")


@pytest.mark.parametrize(
    "name", ["nope", "npz:", "torchvision:NoSuchSet:/tmp", "torchvision:MNIST"]
)
def test_unresolvable_names_raise_registry_error(name: str) -> None:
    with pytest.raises(RegistryError):
        load_dataset(name, "train")


def test_a_torchvision_set_that_is_not_on_disk_is_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="never downloads"):
        load_dataset(f"torchvision:MNIST:{tmp_path}", "train")

    assert list(tmp_path.rglob("*.gz")) == []


def test_npz_with_split_arrays_serves_each_split_scaled_to_0_1(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (6, 5, 5), dtype=np.uint8),
        y_train=np.array([0, 1, 2, 0, 1, 2]),
        x_test=np.full((2, 5, 5), 255, dtype=np.uint8),
        y_test=np.array([3, 3]),
    )

    train, test = load_dataset(f"npz:{path}", "train"), load_dataset(f"npz:{path}", "test")
    test_x, test_y = tensors_of(test)

    assert dataset_shape(train) == ((1, 5, 5), 3)
    assert test_x.shape == (2, 1, 5, 5)
    assert torch.all(test_x == 1.0)
    assert test_y.tolist() == [3, 3]


def test_npz_with_x_and_y_serves_the_same_data_for_either_split(tmp_path: Path) -> None:
    path = tmp_path / "local.npz"
    np.savez(path, x=np.zeros((4, 1, 6, 6), dtype=np.float32), y=np.array([0, 1, 0, 1]))

    train_x, _ = tensors_of(load_dataset(f"npz:{path}", "train"))
    test_x, _ = tensors_of(load_dataset(f"npz:{path}", "test"))

    assert train_x.shape == test_x.shape == (4, 1, 6, 6)


def test_npz_channels_last_images_become_channels_first(tmp_path: Path) -> None:
    path = tmp_path / "rgb.npz"
    x = np.zeros((3, 10, 12, 3), dtype=np.float64)
    x[:, :, :, 2] = 0.5
    np.savez(path, x=x, y=np.array([0, 1, 2]))

    images, _ = tensors_of(load_dataset(f"npz:{path}", "train"))

    assert images.shape == (3, 3, 10, 12)
    assert images.dtype == torch.float32
    assert torch.all(images[:, 2] == 0.5)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, 4, 4)), "labels": np.zeros(2, dtype=int)}, "expected x_train"),
        ({"x": np.zeros((2, 4)), "y": np.zeros(2, dtype=int)}, "shape"),
        ({"x": np.zeros((2, 4, 4), dtype=np.int32), "y": np.zeros(2, dtype=int)}, "dtype"),
        ({"x": np.zeros((2, 4, 4)), "y": np.zeros(3, dtype=int)}, "y has shape"),
        ({"x": np.zeros((2, 4, 4)), "y": np.array([0.0, 1.0])}, "non-negative integers"),
        ({"x": np.zeros((2, 4, 4)), "y": np.array([0, -1])}, "non-negative integers"),
    ],
)
def test_npz_files_of_the_wrong_layout_raise_dataset_error(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]

    with pytest.raises(DatasetError, match=message):
        load_dataset(f"npz:{path}", "train")


def test_a_missing_npz_file_or_image_folder_is_named_as_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"no such file or directory: {tmp_path}/absent.npz"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}", "train")
    with pytest.raises(DatasetError, match=f"no such file or directory: {tmp_path}/scans"):
        load_dataset(f"imagefolder:{tmp_path / 'scans'}", "train")


def test_npz_files_holding_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))

    with pytest.raises(DatasetError):
        load_dataset(f"npz:{path}", "train")


def write_images(folder: Path, mode: str, per_class: int = 2) -> None:
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(per_class):
            Image.new(mode, (6, 4)).save(folder / label / f"{i}.png")


def test_an_image_folder_of_grayscale_images_gives_one_channel(tmp_path: Path) -> None:
    write_images(tmp_path, "L")

    dataset = load_dataset(f"imagefolder:{tmp_path}", "test")
    x, y = tensors_of(dataset)

    assert dataset_shape(dataset) == ((1, 4, 6), 2)
    assert x.shape == (4, 1, 4, 6)
    assert sorted(y.tolist()) == [0, 0, 1, 1]


def test_an_image_folder_with_split_folders_serves_the_asked_split(tmp_path: Path) -> None:
    write_images(tmp_path / "train", "RGB", per_class=3)
    write_images(tmp_path / "test", "RGB", per_class=1)

    train = load_dataset(f"imagefolder:{tmp_path}", "train")
    test = load_dataset(f"imagefolder:{tmp_path}", "test")

    assert (len(train), len(test)) == (6, 2)  # type: ignore[arg-type]
    assert dataset_shape(train) == ((3, 4, 6), 2)


def test_an_image_folder_missing_the_asked_split_raises_dataset_error(tmp_path: Path) -> None:
    write_images(tmp_path / "train", "L")

    with pytest.raises(DatasetError, match="no test/"):
        load_dataset(f"imagefolder:{tmp_path}", "test")


def test_an_image_folder_without_images_raises_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "empty_class").mkdir()

    with pytest.raises(DatasetError, match="image folder"):
        load_dataset(f"imagefolder:{tmp_path}", "train")


USER_MODULE = "fedq_test_user_datasets"


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    source = """
        import torch
        from torch.utils.data import TensorDataset

        def tiny(split):
            size = 3 if split == "train" else 1
            return TensorDataset(torch.zeros(size, 1, 2, 2), torch.arange(size))

        def not_a_dataset(split):
            return [1, 2, 3]
    """
    (tmp_path / f"{USER_MODULE}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield USER_MODULE
    sys.modules.pop(USER_MODULE, None)


def test_a_user_dataset_function_receives_the_split(user_module: str) -> None:
    train = load_dataset(f"{user_module}:tiny", "train", allowed_modules=[user_module])
    test = load_dataset(f"{user_module}:tiny", "test", allowed_modules=[user_module])

    assert (len(train), len(test)) == (3, 1)  # type: ignore[arg-type]
    assert dataset_shape(train) == ((1, 2, 2), 3)


def test_a_user_function_returning_no_dataset_raises_registry_error(user_module: str) -> None:
    with pytest.raises(RegistryError, match="list"):
        load_dataset(f"{user_module}:not_a_dataset", "train", allowed_modules=[user_module])


def test_tensors_of_a_tensor_dataset_shares_its_memory() -> None:
    x, y = torch.zeros(4, 1, 2, 2), torch.arange(4)

    got_x, got_y = tensors_of(TensorDataset(x, y))

    assert got_x.data_ptr() == x.data_ptr()
    assert torch.equal(got_y, y)


class ListDataset(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 2, 2), float(index)), index % 3


def test_tensors_of_a_subset_or_any_dataset_stacks_its_samples_in_order() -> None:
    base = TensorDataset(torch.arange(10.0).reshape(10, 1, 1, 1), torch.arange(10) % 3)

    subset_x, subset_y = tensors_of(Subset(base, [7, 2, 5]))
    list_x, list_y = tensors_of(ListDataset(4))

    assert subset_x.flatten().tolist() == [7.0, 2.0, 5.0]
    assert subset_y.tolist() == [1, 2, 2]
    assert list_x.shape == (4, 1, 2, 2)
    assert list_y.tolist() == [0, 1, 2, 0]
    assert list_y.dtype == torch.int64


def test_dataset_shape_counts_classes_up_to_the_largest_label() -> None:
    assert dataset_shape(ListDataset(5)) == ((1, 2, 2), 3)


def test_dataset_shape_of_an_empty_dataset_raises_dataset_error() -> None:
    with pytest.raises(DatasetError, match="empty"):
        dataset_shape(ListDataset(0))
