"""Tensors on the wire: {name, dtype, shape, data} entries with raw little-endian bytes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.errors import TensorError

# Wire dtype name -> little-endian numpy dtype. Object, void and complex kinds never cross the wire.
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
MAX_DIMS = 8
MAX_TENSORS = 10_000
MAX_NAME_LENGTH = 256

Tensors = dict[str, np.ndarray]


def wire_dtype_name(dtype: np.dtype[Any]) -> str:
    """Return the wire name of a numpy dtype, or raise TensorError if it may not cross the wire."""
    for name, wire in WIRE_DTYPES.items():
        if wire.kind == dtype.kind and wire.itemsize == dtype.itemsize:
            return name
    raise TensorError(f"dtype {dtype} cannot cross the wire", reason="bad_dtype")


def encode_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    """Return the wire entry of one array: its bytes little-endian and C-ordered."""
    dtype_name = wire_dtype_name(array.dtype)
    # Not np.ascontiguousarray: it turns a 0-d scalar into shape (1,).
    contiguous = np.asarray(array, dtype=WIRE_DTYPES[dtype_name], order="C")
    return {
        "name": name,
        "dtype": dtype_name,
        "shape": list(contiguous.shape),
        # A memoryview avoids one model-sized copy; msgpack packs it as bin.
        "data": memoryview(contiguous.data).cast("B") if contiguous.size else b"",
    }


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Return the wire entries of named arrays, keeping their order."""
    return [encode_tensor(name, array) for name, array in tensors.items()]


def decode_tensor(entry: Any) -> tuple[str, np.ndarray]:
    """Validate one wire entry and return (name, read-only array viewing its bytes)."""
    if not isinstance(entry, dict):
        raise TensorError("a tensor entry must be a map")
    missing = {"name", "dtype", "shape", "data"} - entry.keys()
    if missing:
        raise TensorError(f"tensor entry lacks {sorted(missing)}")
    name, dtype_name, shape, data = entry["name"], entry["dtype"], entry["shape"], entry["data"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise TensorError("tensor name must be a non-empty string of at most 256 characters")
    if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
        raise TensorError(f"tensor {name!r}: dtype {dtype_name!r} is not allowed", "bad_dtype")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise TensorError(f"tensor {name!r}: shape must be a list of at most 8 non-negative ints")
    # decode_message hands over bin data as a read-only memoryview of the payload.
    if not isinstance(data, (bytes, memoryview)):
        raise TensorError(f"tensor {name!r}: data must be bin")
    dtype = WIRE_DTYPES[dtype_name]
    if math.prod(shape) * dtype.itemsize != len(data):
        raise TensorError(
            f"tensor {name!r}: {len(data)} bytes do not hold shape {shape} of {dtype_name}",
            reason="bad_length",
        )
    try:
        return name, np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as e:  # a zero-size shape whose other dims overflow numpy's limits
        raise TensorError(f"tensor {name!r}: shape {shape} is too large: {e}") from e


def decode_tensors(entries: Any) -> Tensors:
    """Validate a list of wire entries and return the named arrays in order."""
    if not isinstance(entries, list):
        raise TensorError("tensors must be a list")
    if len(entries) > MAX_TENSORS:
        raise TensorError(f"{len(entries)} tensors exceed the limit of {MAX_TENSORS}")
    tensors: Tensors = {}
    for entry in entries:
        name, array = decode_tensor(entry)
        if name in tensors:
            raise TensorError(f"tensor {name!r} appears twice", reason="duplicate_tensor")
        tensors[name] = array
    return tensors


def check_like(tensors: Tensors, reference: Mapping[str, np.ndarray]) -> None:
    """Raise TensorError unless tensors have exactly the reference's names, shapes and dtypes."""
    if list(tensors) != list(reference):
        missing = [n for n in reference if n not in tensors]
        extra = [n for n in tensors if n not in reference]
        if missing or extra:
            raise TensorError(f"tensor names differ: missing {missing}, extra {extra}", "bad_names")
        raise TensorError("tensors are not in the model's state_dict order", reason="bad_names")
    for name, array in tensors.items():
        ref = reference[name]
        if array.shape != ref.shape:
            raise TensorError(
                f"tensor {name!r}: shape {list(array.shape)} != {list(ref.shape)}", "bad_shape"
            )
        if array.dtype != ref.dtype:
            raise TensorError(f"tensor {name!r}: dtype {array.dtype} != {ref.dtype}", "bad_dtype")


def check_finite(tensors: Tensors) -> None:
    """Raise TensorError if any floating-point value is NaN or infinite."""
    largest_finite_abs(tensors)


def largest_finite_abs(tensors: Tensors) -> dict[str, float]:
    """Raise TensorError (not_finite) if any floating-point value is NaN or infinite; else return
    each floating-point tensor's largest |value|. Its min and max are taken anyway: the
    aggregator reuses them for its range check and to bound its sums."""
    largest: dict[str, float] = {}
    for name, array in tensors.items():
        if array.dtype.kind != "f":
            continue
        lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        # min and max propagate NaN and show an Inf, without isfinite's array of booleans.
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise TensorError(f"tensor {name!r} holds NaN or Inf", reason="not_finite")
        largest[name] = max(-lo, hi)
    return largest


def first_nonfinite(tensors: Mapping[str, np.ndarray]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or Inf, or None."""
    for name, array in tensors.items():
        # min and max propagate NaN and show an Inf, without isfinite's array of booleans:
        # the aggregator checks every new version, so this is on its hot path.
        finite = array.dtype.kind != "f" or not array.size
        if not (finite or (math.isfinite(array.min()) and math.isfinite(array.max()))):
            return name
    return None
