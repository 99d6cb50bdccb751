"""msgpack writing of a message map with tensor data spliced in by reference, not copied."""

from __future__ import annotations

from typing import Any

import msgpack


def pack_message(body: dict[str, Any]) -> bytes:
    """The bytes of msgpack.packb(body, use_bin_type=True), exactly.

    Tensor data (and any other bin) is spliced in with one join instead of being copied through
    msgpack's growing buffer.
    """
    parts: list[bytes | memoryview] = []
    _pack_into(body, parts, msgpack.Packer(use_bin_type=True, buf_size=4096))
    return b"".join(parts)


_BYTES_LIKE = (bytes, bytearray, memoryview)
_SCALARS = (str, int, float, bool, type(None))


def _is_plain(value: Any) -> bool:
    """Whether value certainly holds no bin: a scalar or a list of scalars (a shape)."""
    kind = type(value)
    return kind in _SCALARS or (kind is list and all(type(v) in _SCALARS for v in value))


def _pack_into(obj: Any, parts: list[bytes | memoryview], packer: msgpack.Packer) -> None:
    """Append obj's msgpack bytes to parts, leaving bin payloads as references, not copies.

    Runs of plain items of a map or array are packed by msgpack in one call, as a map or array
    of their own whose header is then dropped, since msgpack packs items independently.
    """
    if isinstance(obj, _BYTES_LIKE):
        data = obj if type(obj) is memoryview else memoryview(obj)
        parts += (_bin_header(data.nbytes), data)
    elif type(obj) is dict:
        parts.append(_container_header(len(obj), 0x80, 0xDE))
        run: dict[Any, Any] = {}
        for key, value in obj.items():
            if _is_plain(value):
                run[key] = value
                continue
            _pack_run(run, parts, packer)
            run = {}
            parts.append(packer.pack(key))
            _pack_into(value, parts, packer)
        _pack_run(run, parts, packer)
    elif type(obj) is list:
        parts.append(_container_header(len(obj), 0x90, 0xDC))
        items: list[Any] = []
        for item in obj:
            if type(item) is dict and tuple(item) == _TENSOR_ENTRY_KEYS:
                _pack_run(items, parts, packer)
                items = []
                _pack_tensor_entry(item, parts, packer)
                continue
            if _is_plain(item):
                items.append(item)
                continue
            _pack_run(items, parts, packer)
            items = []
            _pack_into(item, parts, packer)
        _pack_run(items, parts, packer)
    else:
        parts.append(packer.pack(obj))


# A tensor entry as shared.tensors.encode_tensor makes it, keys in this order.
_TENSOR_ENTRY_KEYS = ("name", "dtype", "shape", "data")
_DATA_KEY = msgpack.packb("data")


def _pack_tensor_entry(
    entry: dict[str, Any], parts: list[bytes | memoryview], packer: msgpack.Packer
) -> None:
    """A tensor entry in one msgpack call for its three small fields, then its data by reference.

    The three fields packed as a map of three start with the fixmap byte 0x83; the entry is that
    map with "data" added, so its header is 0x84 and the rest is the same bytes.
    """
    data = entry["data"]
    if not isinstance(data, _BYTES_LIKE) or not _is_plain(entry["shape"]):
        _pack_into(entry, parts, packer)
        return
    small = packer.pack({"name": entry["name"], "dtype": entry["dtype"], "shape": entry["shape"]})
    view = data if type(data) is memoryview else memoryview(data)
    parts += (b"\x84", small[1:], _DATA_KEY, _bin_header(view.nbytes), view)


def _pack_run(
    run: dict[Any, Any] | list[Any], parts: list[bytes | memoryview], packer: msgpack.Packer
) -> None:
    if run:
        size = len(run)
        parts.append(packer.pack(run)[1 if size < 16 else 3 if size < 0x10000 else 5 :])


def _bin_header(size: int) -> bytes:
    # msgpack spec: bin 8 / bin 16 / bin 32, the length big-endian; packb picks the smallest.
    if size < 0x100:
        return bytes((0xC4, size))
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    if size <= 0xFFFFFFFF:
        return b"\xc6" + size.to_bytes(4, "big")
    raise ValueError(f"{size} bytes do not fit one msgpack bin")


def _container_header(size: int, fix: int, code16: int) -> bytes:
    # fixmap/fixarray up to 15 items, then map/array 16 (code16) and 32 (code16 + 1).
    if size < 16:
        return bytes((fix | size,))
    if size < 0x10000:
        return bytes((code16,)) + size.to_bytes(2, "big")
    return bytes((code16 + 1,)) + size.to_bytes(4, "big")
