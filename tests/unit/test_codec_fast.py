"""Tests of the fast codec paths: spliced encoding writes msgpack's bytes, zero-copy decoding reads
msgpack's values, and bad input is rejected exactly as the plain msgpack path rejects it."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec import (
    FAST,
    VALID_PAYLOADS,
    hellos,
    jobs,
    mutated_payloads,
    sample_task,
    sample_update,
    tasks,
    update_body,
    updates,
)

from shared.errors import ProtocolError
from shared.messages import (
    PROTOCOL_VERSION,
    GlobalModel,
    Message,
    Task,
    Update,
    _body,
    decode_message,
    encode_message,
)
from shared.tensors import WIRE_DTYPES

# ------------------------------------------------------------------ helpers


def reference_encoding(message: Message) -> bytes:
    """What encode_message wrote before it spliced tensor bytes: one msgpack.packb of the map."""
    kind, body = _body(message)
    packed: bytes = msgpack.packb(
        {"protocol": PROTOCOL_VERSION, "type": kind} | body, use_bin_type=True
    )
    return packed


def outcome(payload: bytes | bytearray) -> tuple[Any, ...]:
    """The decoded message's values, or the error's class, reason and text.

    A bytearray payload takes the plain msgpack path, a bytes payload the zero-copy one.
    """
    try:
        message = decode_message(payload)  # type: ignore[arg-type]
    except ProtocolError as e:
        return ("error", type(e), e.reason, str(e))
    return ("ok", comparable(message))


def comparable(message: Any) -> Any:
    """The message with arrays turned into (dtype, shape, bytes) so that == compares them."""
    if isinstance(message, Task):
        return dataclasses.replace(message, model=comparable(message.model))
    if isinstance(message, GlobalModel | Update):
        arrays = {n: (a.dtype.str, a.shape, a.tobytes()) for n, a in message.tensors.items()}
        return dataclasses.replace(message, tensors=arrays)  # type: ignore[arg-type]
    return message


def both_paths_agree(payload: bytes) -> None:
    assert outcome(payload) == outcome(bytearray(payload))


def update_of(*arrays: np.ndarray, **changes: Any) -> Update:
    tensors = {f"t{i}": array for i, array in enumerate(arrays)}
    return sample_update(tensors=tensors, **changes)


# ------------------------------------------------------------------ encoding


@FAST
@given(message=updates | tasks | hellos | jobs)
def test_the_encoder_writes_exactly_the_bytes_msgpack_packb_writes(message: Message) -> None:
    assert encode_message(message) == reference_encoding(message)


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_every_dtype_empty_and_scalar_tensors_encode_as_msgpack_packb_does(dtype: str) -> None:
    wire = WIRE_DTYPES[dtype]
    message = update_of(
        np.zeros((3, 5), dtype=wire),
        np.ones((), dtype=wire),
        np.zeros((0,), dtype=wire),
        np.zeros((4, 0, 2), dtype=wire),
        np.arange(7).astype(wire.newbyteorder(">")),
    )

    assert encode_message(message) == reference_encoding(message)


@pytest.mark.parametrize(
    "size", [0, 1, 255, 256, 257, 65535, 65536, 65537, 2**16 * 3 + 1, 2**20 + 3]
)
def test_bins_around_the_bin8_bin16_and_bin32_boundaries_encode_as_msgpack_packb_does(
    size: int,
) -> None:
    message = update_of(np.arange(size, dtype=np.uint8), np.zeros(size, dtype=np.int8))

    encoded = encode_message(message)

    assert encoded == reference_encoding(message)
    assert decode_message(encoded).tensors["t0"].tobytes() == bytes(range(256)) * (
        size // 256
    ) + bytes(range(size % 256))


@pytest.mark.parametrize("count", [0, 1, 15, 16, 17])
def test_maps_and_arrays_around_the_fixmap_and_fixarray_limit_encode_as_packb_does(
    count: int,
) -> None:
    tensors = [np.full((2,), i, dtype=np.float32) for i in range(count)]
    metrics = {f"m{i}": float(i) for i in range(count)}
    update = update_of(*tensors, metrics=metrics)
    task = dataclasses.replace(
        sample_task(), model=dataclasses.replace(sample_task().model, tensors=update.tensors)
    )

    assert encode_message(update) == reference_encoding(update)
    assert encode_message(task) == reference_encoding(task)


def test_more_than_65535_tensors_in_a_map_header_encode_as_packb_does() -> None:
    # No real message has 65536 tensors (decoders refuse more than 10,000); the array32 header is
    # reached here only to check the header writer against msgpack.
    message = update_of(*[np.zeros((), dtype=np.uint8)] * 65536)

    assert encode_message(message) == reference_encoding(message)


# ------------------------------------------------------------------ zero-copy decoding


def test_decoded_tensors_are_read_only_views_of_a_bytes_payload() -> None:
    payload = encode_message(update_of(np.arange(1000, dtype=np.float32)))

    array = decode_message(payload).tensors["t0"]  # type: ignore[union-attr]

    assert not array.flags.writeable
    assert np.shares_memory(array, np.frombuffer(payload, dtype=np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        array[0] = 1.0


def test_a_task_models_tensors_are_views_of_the_payload_too() -> None:
    payload = encode_message(sample_task())

    task = decode_message(payload)

    assert isinstance(task, Task)
    for array in task.model.tensors.values():
        assert not array.flags.writeable
        assert np.shares_memory(array, np.frombuffer(payload, dtype=np.uint8))


def test_a_bytearray_payload_is_copied_so_that_changing_it_cannot_change_the_arrays() -> None:
    payload = bytearray(encode_message(update_of(np.zeros(64, dtype=np.uint8))))

    array = decode_message(payload).tensors["t0"]  # type: ignore[arg-type, union-attr]
    payload[-64:] = b"\xff" * 64

    assert not array.flags.writeable
    assert array.tobytes() == bytes(64)


@FAST
@given(message=updates | tasks | hellos | jobs)
def test_the_zero_copy_path_decodes_every_message_as_the_msgpack_path_does(
    message: Message,
) -> None:
    both_paths_agree(encode_message(message))


@settings(max_examples=400, deadline=None)
@given(payload=mutated_payloads())
def test_mutated_messages_get_the_same_error_and_reason_on_both_paths(payload: bytes) -> None:
    both_paths_agree(payload)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=256))
def test_random_bytes_get_the_same_error_on_both_paths(payload: bytes) -> None:
    both_paths_agree(payload)


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


UNUSUAL_BODIES = {
    "an ext value": update_body(extra=msgpack.ExtType(5, b"xy")),
    "a timestamp": update_body(sent_at=msgpack.Timestamp(1, 0)),
    "a bytes key": {b"protocol": 1} | update_body(),
    "an int key in the metrics": update_body(metrics={1: 2.0}),
    "data that is a str": update_body(
        tensors=[{"name": "w", "dtype": "uint8", "shape": [2], "data": "ab"}]
    ),
    "a name that is bin": update_body(
        tensors=[{"name": b"w", "dtype": "uint8", "shape": [2], "data": b"ab"}]
    ),
    "data of the wrong length": update_body(
        tensors=[{"name": "w", "dtype": "float32", "shape": [2], "data": b"abc"}]
    ),
    "two data keys": update_body(
        tensors=[{"name": "w", "dtype": "uint8", "shape": [1], "data": b"ab", "data ": b"c"}]
    ),
    "nesting deeper than the fast reader goes": update_body(extra=_deep(40)),
    "float32 numbers": None,  # packed by hand below
    "more items than the fast reader reads": update_body(extra=[0] * 300_000),
    "tensors that are not a list": update_body(tensors={"w": b"ab"}),
    "a model that is not a map": update_body(type="task", model=[1, 2]),
}


@pytest.mark.parametrize("case", sorted(UNUSUAL_BODIES))
def test_unusual_but_well_formed_msgpack_decodes_as_the_msgpack_path_does(case: str) -> None:
    body = UNUSUAL_BODIES[case]
    if body is None:
        packed = msgpack.packb(update_body(), use_bin_type=True, use_single_float=True)
    else:
        packed = msgpack.packb(body, use_bin_type=True)

    both_paths_agree(packed)


HOSTILE_PAYLOADS = {
    "trailing bytes": VALID_PAYLOADS[0] + b"\x00",
    "a truncated tensor": VALID_PAYLOADS[0][:-3],
    "invalid utf-8 in a key": b"\x81\xa2\xff\xfe\x01",
    "the never-used type byte": b"\x81\xa1a\xc1",
    "a bin32 claiming 4 GiB": b"\x81\xa4data\xc6\xff\xff\xff\xf0xx",
    "a map32 claiming 4 G pairs": b"\xdf\xff\xff\xff\xf0\xa1a\x01",
    "an array32 claiming 4 G items": b"\x81\xa1a\xdd\xff\xff\xff\xf0\x01",
    "a str32 cut short": b"\x81\xa1a\xdb\x00\x00\x00\x10abc",
    "a float64 cut short": b"\x81\xa1a\xcb\x00\x00",
    "a map that is not at the top": b"\x92\x01\x02",
    "an empty payload": b"",
    "nesting deeper than msgpack allows": b"\x81\xa1a" + b"\x91" * 2000 + b"\x01",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PAYLOADS))
def test_hostile_payloads_get_the_same_error_and_reason_on_both_paths(case: str) -> None:
    payload = HOSTILE_PAYLOADS[case]

    with pytest.raises(ProtocolError):
        decode_message(payload)
    both_paths_agree(payload)
