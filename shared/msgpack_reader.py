"""msgpack reading of a message map under the size limits: tensor data as views of the payload.

The limits (docs/protocol.md section 2.1) are kept while a message is read, stopping at the first
count past one, so that what a message costs in memory is bounded by what it may hold, not by its
sender. A type's limit on its encoded size comes with its registration (shared/codec.py).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from shared.errors import MalformedMessageError, MessageTooLargeError

# Items of all maps and arrays of a message together (a map entry is two): an honest update of
# 10,000 tensors of 8 dims holds 170,000. Tiny items are what decoding amplifies (an empty map
# is one byte on the wire and 64 in Python).
MAX_MESSAGE_ITEMS = 250_000
# The bytes of a message other than its tensors' data: ids, names, shapes, metrics, a job
# specification (the data is read as views of the payload; everything else is copied).
MAX_NON_TENSOR_BYTES = 8 * 1024 * 1024


def read_message(payload: bytes, type_limits: Mapping[str, int]) -> dict[str, Any]:
    """Read a payload as one msgpack map within the size limits; type_limits maps a `type` to the
    most bytes a message of it may take (types not in it are bounded by the receiver).

    The limits hold before anything past them is built: the zero-copy reader keeps them as it
    reads, and a payload it leaves to msgpack is checked by check_size first. Tensors of a bytes
    payload are read-only views of it, so they keep the payload alive.
    """
    body: Any = _read_in_place(payload, type_limits)
    if body is None:
        check_size(payload, type_limits)
        try:
            body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises bare exceptions on some truncations
            raise MalformedMessageError(f"not a msgpack message: {type(e).__name__}: {e}") from e
    if not isinstance(body, dict):
        raise MalformedMessageError("a message must be a msgpack map")
    return body


class _Unusual(Exception):
    """Input the zero-copy reader leaves to msgpack; never escapes read_message."""


# Nesting past this is left to msgpack's C code (after check_size), as is anything unusual.
_FAST_MAX_DEPTH = 16
_U8, _U16, _U32, _U64 = (struct.Struct(f">{c}") for c in "BHIQ")
_I8, _I16, _I32, _I64 = (struct.Struct(f">{c}") for c in "bhiq")
_F32, _F64 = struct.Struct(">f"), struct.Struct(">d")
_CONSTANTS = {0xC0: None, 0xC2: False, 0xC3: True}
# Type byte -> (struct of the length or value that follows, what it is).
_SIZED = {
    0xC4: (_U8, "bin"), 0xC5: (_U16, "bin"), 0xC6: (_U32, "bin"),
    0xCA: (_F32, "num"), 0xCB: (_F64, "num"),
    0xCC: (_U8, "num"), 0xCD: (_U16, "num"), 0xCE: (_U32, "num"), 0xCF: (_U64, "num"),
    0xD0: (_I8, "num"), 0xD1: (_I16, "num"), 0xD2: (_I32, "num"), 0xD3: (_I64, "num"),
    0xD9: (_U8, "str"), 0xDA: (_U16, "str"), 0xDB: (_U32, "str"),
    0xDC: (_U16, "array"), 0xDD: (_U32, "array"), 0xDE: (_U16, "map"), 0xDF: (_U32, "map"),
}  # fmt: skip


class _ZeroCopyReader:
    """Reads the msgpack of a message as msgpack.unpackb would, but tensor data as views.

    Only the `data` bins of the entries of a `tensors` list (of the message, or of a task's
    `model`) become read-only memoryviews of the payload; everything else is built as msgpack
    builds it. It keeps the size limits of check_size as it goes, stopping as soon as a count
    passes its limit, so it never builds more than they allow. Anything unusual (ext types,
    non-str keys, truncation, trailing bytes, invalid UTF-8, deep nesting) or past a limit raises
    _Unusual, and read_message then checks the payload with check_size and reads it with
    msgpack, so errors and their reasons are those of check_size and msgpack. A payload this
    reader reads whole is one check_size passes: the same items, in the same order, are counted.
    """

    def __init__(self, payload: bytes, type_limits: Mapping[str, int]) -> None:
        self.payload = payload
        self.type_limits = type_limits
        self.view = memoryview(payload)
        self.pos = 0
        self.budget = MAX_MESSAGE_ITEMS
        self.data_bytes = 0  # of the tensor data read so far (views, not counted as copied)

    def message(self) -> dict[str, Any]:
        """Read the whole payload as one map."""
        body = self.value(0, "message")
        if (
            type(body) is not dict
            or self.pos != len(self.payload)
            or self.pos - self.data_bytes > MAX_NON_TENSOR_BYTES
        ):
            raise _Unusual
        return body

    def value(self, depth: int, role: str) -> Any:
        """Read the value at pos; role says where it sits: message, model, tensors, entry, data."""
        byte = self.payload[self.pos]
        self.pos += 1
        if byte <= 0x7F:
            return byte
        if byte >= 0xE0:
            return byte - 0x100
        if byte <= 0x8F:
            return self.map(byte & 0x0F, depth, role)
        if byte <= 0x9F:
            return self.array(byte & 0x0F, depth, role)
        if byte <= 0xBF:
            return self.text(byte & 0x1F)
        if byte in _CONSTANTS:
            return _CONSTANTS[byte]
        sized = _SIZED.get(byte)
        if sized is None:  # ext types and the never-used 0xc1
            raise _Unusual
        (number,) = sized[0].unpack_from(self.payload, self.pos)
        self.pos += sized[0].size
        if sized[1] == "num":
            return number
        if sized[1] == "str":
            return self.text(number)
        if sized[1] == "bin":
            return self.binary(number, role)
        if sized[1] == "array":
            return self.array(number, depth, role)
        return self.map(number, depth, role)

    def text(self, size: int) -> str:
        end = self.pos + size
        # pos - data_bytes only grows, so past the limit here is past it at the end too.
        if end > len(self.payload) or end - self.data_bytes > MAX_NON_TENSOR_BYTES:
            raise _Unusual
        text = self.payload[self.pos : end].decode("utf-8")
        self.pos = end
        return text

    def binary(self, size: int, role: str) -> bytes | memoryview:
        end = self.pos + size
        if end > len(self.payload):
            raise _Unusual
        self.pos, start = end, self.pos
        if role == "data":
            self.data_bytes += size
            return self.view[start:end]
        if end - self.data_bytes > MAX_NON_TENSOR_BYTES:
            raise _Unusual
        return self.payload[start:end]

    def array(self, size: int, depth: int, role: str) -> list[Any]:
        self.spend(size, depth)
        item_role = "entry" if role == "tensors" else ""
        return [self.value(depth + 1, item_role) for _ in range(size)]

    def map(self, size: int, depth: int, role: str) -> dict[str, Any]:
        self.spend(2 * size, depth)
        out: dict[str, Any] = {}
        for _ in range(size):
            key = self.value(depth + 1, "")
            if type(key) is not str:  # msgpack also allows bytes keys; leave those to it
                raise _Unusual
            value = self.value(depth + 1, _ROLES.get((role, key), ""))
            if role == "message" and key == "type" and type(value) is str:
                limit = self.type_limits.get(value)
                if limit is not None and len(self.payload) > limit:
                    raise _Unusual
            out[key] = value
        return out

    def spend(self, items: int, depth: int) -> None:
        # Every item takes at least a byte, so a count past the bytes left is a lie.
        self.budget -= items
        if self.budget < 0 or depth >= _FAST_MAX_DEPTH or items > len(self.payload) - self.pos:
            raise _Unusual


_ROLES = {
    ("message", "tensors"): "tensors",
    ("message", "model"): "model",
    ("model", "tensors"): "tensors",
    ("entry", "data"): "data",
}


def _read_in_place(payload: bytes, type_limits: Mapping[str, int]) -> dict[str, Any] | None:
    """Return the message map of payload, tensor data as views of it, if it is an ordinary message
    within the size limits; None if it is to be checked and read the slow way."""
    # Only immutable bytes are viewed: a view of a bytearray could change under the arrays.
    if type(payload) is not bytes:
        return None
    try:
        return _ZeroCopyReader(payload, type_limits).message()
    except (_Unusual, IndexError, struct.error, UnicodeDecodeError):
        return None


def check_size(payload: bytes, type_limits: Mapping[str, int]) -> None:
    """Raise MessageTooLargeError if the payload is over its type's size limit (type_limits),
    holds more than MAX_MESSAGE_ITEMS items or more than MAX_NON_TENSOR_BYTES outside tensor data.

    Reads only msgpack headers, building nothing; other faults are left to the decoder, which
    stops at them too (so it builds no more than what was counted here).
    """
    skim = _Skim(payload, type_limits)
    try:
        skim.value("message")
    except (_Unusual, IndexError, struct.error):
        return
    other = len(payload) - skim.data_bytes
    if other > MAX_NON_TENSOR_BYTES:
        raise MessageTooLargeError(
            f"{other} bytes outside tensor data exceed {MAX_NON_TENSOR_BYTES}"
        )


_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_EXT = {0xC7: _U8, 0xC8: _U16, 0xC9: _U32}
# The parts of a message whose layout check_size follows (the rest it skips in one loop).
_LAID_OUT = frozenset(("message", "model", "tensors", "entry"))


class _Skim:
    """Walks a msgpack message without building it: counts items, tensor data bytes, and checks
    the size limit of its `type` as soon as it is read."""

    def __init__(self, payload: bytes, type_limits: Mapping[str, int]) -> None:
        self.payload = payload
        self.type_limits = type_limits
        self.pos = 0
        self.items = MAX_MESSAGE_ITEMS
        self.data_bytes = 0

    def value(self, role: str) -> None:
        """Skip the value at pos; `role` as in _ZeroCopyReader (message, model, tensors, ...)."""
        if role not in _LAID_OUT:
            self.skip()
            return
        what, count = self.head()
        if what == "array":
            self.spend(count)
            for _ in range(count):
                self.value("entry" if role == "tensors" else "")
        elif what == "map":
            self.spend(2 * count)
            for _ in range(count):
                key = self.small()
                if role == "message" and key == "type":
                    self.check_type(self.small())
                elif role == "entry" and key == "data":
                    self.data()
                else:
                    self.value(_ROLES.get((role, key), "") if isinstance(key, str) else "")
        elif what == "bin":
            self.pos += count

    def data(self) -> None:
        start = self.pos
        what, count = self.head()
        if what == "bin":
            self.data_bytes += count
            self.pos += count
        else:
            self.pos = start
            self.skip()

    def check_type(self, kind: Any) -> None:
        limit = self.type_limits.get(kind) if isinstance(kind, str) else None
        if limit is not None and len(self.payload) > limit:
            raise MessageTooLargeError(
                f"a {kind} of {len(self.payload)} bytes exceeds the {limit} bytes it may take"
            )

    def small(self) -> Any:
        """Skip a value and return it if it is short (a key, a type), else None."""
        start = self.pos
        self.skip()
        if self.pos - start > 64 or self.pos > len(self.payload):
            return None
        try:
            return msgpack.unpackb(self.payload[start : self.pos], raw=False)
        except Exception as e:  # invalid UTF-8 and the like: the decoder says what is wrong
            raise _Unusual from e

    def skip(self) -> None:
        """Skip one value, however nested, counting the items of its maps and arrays."""
        pending = 1
        while pending:
            pending -= 1
            what, count = self.head()
            if what == "bin":
                self.pos += count
            elif what != "scalar":
                items = 2 * count if what == "map" else count
                self.spend(items)
                pending += items

    def spend(self, items: int) -> None:
        # Every item takes a byte at least: a count past the bytes left is a lie for the decoder.
        if items > len(self.payload) - self.pos:
            raise _Unusual
        self.items -= items
        if self.items < 0:
            raise MessageTooLargeError(f"more than {MAX_MESSAGE_ITEMS} msgpack items")

    def head(self) -> tuple[str, int]:
        """Read the header at pos: ("map" or "array", items), ("bin", size) with pos at its
        bytes, or ("scalar", 0) with pos past the whole value (nil, bool, number, str, ext)."""
        payload = self.payload
        byte = payload[self.pos]
        self.pos += 1
        if byte <= 0x7F or byte >= 0xE0 or byte in _CONSTANTS:
            return "scalar", 0
        if byte <= 0x8F:
            return "map", byte & 0x0F
        if byte <= 0x9F:
            return "array", byte & 0x0F
        if byte <= 0xBF:
            self.pos += byte & 0x1F
            return "scalar", 0
        if byte in _FIXEXT:
            self.pos += 1 + _FIXEXT[byte]
            return "scalar", 0
        if byte in _EXT:
            (size,) = _EXT[byte].unpack_from(payload, self.pos)
            self.pos += _EXT[byte].size + 1 + size
            return "scalar", 0
        sized = _SIZED.get(byte)
        if sized is None:
            raise _Unusual
        (number,) = sized[0].unpack_from(payload, self.pos)
        self.pos += sized[0].size
        if sized[1] == "num":
            return "scalar", 0
        if sized[1] == "str":
            self.pos += number
            return "scalar", 0
        return sized[1], number
