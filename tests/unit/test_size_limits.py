"""The codec's size limits (docs/protocol.md section 2.1): checked before anything is decoded."""

from __future__ import annotations

import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest

from shared.errors import ProtocolError
from shared.jobs import ModelSpec, TrainingConfig
from shared.messages import (
    MAX_MESSAGE_ITEMS,
    MAX_NON_TENSOR_BYTES,
    MAX_TYPE_BYTES,
    GlobalModel,
    Hello,
    Task,
    Update,
    decode_message,
    encode_message,
)

HELLO = {
    "protocol": 1,
    "type": "hello",
    "worker_id": "w1",
    "num_samples": 1,
    "device": "cpu",
    "sent_at": 1.0,
}


def _update(**extra: Any) -> dict[str, Any]:
    update = Update("job-1", "u1", "w1", "t1", 0, None, "weights", 10, {"w": np.ones(4, "f4")})
    body: dict[str, Any] = msgpack.unpackb(encode_message(update))
    return body | extra


def _reason(body: dict[str, Any]) -> str:
    with pytest.raises(ProtocolError) as caught:
        decode_message(msgpack.packb(body, use_bin_type=True))
    return caught.value.reason


def test_a_hello_of_twelve_megabytes_of_empty_maps_is_too_large_and_never_built() -> None:
    payload = msgpack.packb(HELLO | {"junk": [{}] * (12 * 1024 * 1024)})
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as caught:
            decode_message(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert caught.value.reason == "too_large"
    assert peak < 1024 * 1024


def test_a_small_message_type_is_held_to_its_limit_wherever_its_type_key_stands() -> None:
    junk = "x" * MAX_TYPE_BYTES["hello"]

    assert _reason({"junk": junk} | HELLO) == "too_large"
    assert _reason(HELLO | {"junk": junk}) == "too_large"
    assert _reason({"protocol": 1, "type": "job", "junk": "x" * (1 << 20)}) == "too_large"


def test_a_hello_within_its_limit_is_decoded() -> None:
    assert isinstance(decode_message(msgpack.packb(HELLO | {"junk": [{}] * 60_000})), Hello)


def test_an_update_of_more_tiny_items_than_any_message_holds_is_too_large() -> None:
    assert _reason(_update(padding=[{}] * (MAX_MESSAGE_ITEMS + 1))) == "too_large"
    assert _reason(_update(metrics={str(i): 0 for i in range(MAX_MESSAGE_ITEMS)})) == "too_large"


def test_an_update_with_megabytes_outside_its_tensor_data_is_too_large() -> None:
    assert _reason(_update(padding="x" * (MAX_NON_TENSOR_BYTES + 1))) == "too_large"
    assert _reason(_update(padding=b"x" * (MAX_NON_TENSOR_BYTES + 1))) == "too_large"


def test_tensor_data_of_any_size_is_not_counted_against_the_limits() -> None:
    big = np.ones(3 * MAX_NON_TENSOR_BYTES // 4, "f4")
    update = Update("job-1", "u1", "w1", "t1", 0, None, "weights", 10, {"w": big})
    model = GlobalModel("job-1", 0, ModelSpec("mlp", (1, 8, 8), 10), {"w": big})
    task = Task("job-1", "t1", "w1", None, TrainingConfig(), model)

    assert isinstance(decode_message(encode_message(update)), Update)
    assert isinstance(decode_message(encode_message(task)), Task)


def test_the_largest_honest_update_is_within_the_limits() -> None:
    tensors = {f"layer{i}.weight": np.ones((1,) * 8, "f4") for i in range(10_000)}
    update = Update("job-1", "u1", "w1", "t1", 0, None, "weights", 10, tensors)

    decoded = decode_message(encode_message(update))

    assert isinstance(decoded, Update) and len(decoded.tensors) == 10_000


def test_malformed_input_keeps_its_own_reason() -> None:
    assert _reason(HELLO | {"worker_id": 3}) == "bad_field"
    with pytest.raises(ProtocolError) as caught:
        decode_message(msgpack.packb(HELLO)[:-3])
    assert caught.value.reason == "malformed"
