"""The table of message types: a new type is one registration, encoded, decoded and size-limited
as the built-in ones are, and a type a table does not hold is `unknown_type`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest

from shared.codec import MESSAGE_TYPES, MessageTypes, _field, _id, _time
from shared.errors import MessageTooLargeError, ProtocolError, UnknownMessageTypeError
from shared.messages import MAX_TYPE_BYTES, Hello, decode_message, encode_message

PING_LIMIT = 1024


@dataclass(frozen=True)
class Ping:
    """A throw-away message type, as a new protocol phase would add one."""

    worker_id: str
    note: str
    sent_at: float = field(default_factory=time.time)


def _encode_ping(ping: Ping) -> dict[str, Any]:
    return {"worker_id": ping.worker_id, "note": ping.note, "sent_at": ping.sent_at}


def _decode_ping(body: dict[str, Any]) -> Ping:
    return Ping(
        worker_id=_id(body, "worker_id"),
        note=str(_field(body, "note", (str,))),
        sent_at=_time(body, "sent_at"),
    )


@pytest.fixture
def types() -> MessageTypes:
    """A table of its own holding only the ping, so the codec's table is never changed."""
    table = MessageTypes()
    table.register("ping", Ping, _encode_ping, _decode_ping, max_bytes=PING_LIMIT)
    return table


def _ping_payload(note: str) -> bytes:
    body = {"protocol": 1, "type": "ping", "worker_id": "w1", "note": note, "sent_at": 1.0}
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def test_a_registered_type_is_encoded_with_protocol_and_type_first_and_decoded_back(
    types: MessageTypes,
) -> None:
    ping = Ping("w1", "hi", sent_at=2.5)

    payload = types.encode(ping)

    assert list(msgpack.unpackb(payload)) == ["protocol", "type", "worker_id", "note", "sent_at"]
    assert msgpack.unpackb(payload)["type"] == "ping"
    assert types.decode(payload) == ping


def test_a_registered_type_is_held_to_its_size_limit_on_both_decoding_paths(
    types: MessageTypes,
) -> None:
    payload = _ping_payload("x" * PING_LIMIT)

    # bytes are read by the zero-copy reader, a bytearray by check_size and msgpack.
    for copy in (payload, bytearray(payload)):
        with pytest.raises(MessageTooLargeError) as caught:
            types.decode(copy)  # type: ignore[arg-type]
        assert caught.value.reason == "too_large"
    assert types.decode(_ping_payload("x" * (PING_LIMIT - 100))) == Ping("w1", "x" * 924, 1.0)


def test_a_registered_type_has_its_fields_checked_by_its_decoder(types: MessageTypes) -> None:
    body = {"protocol": 1, "type": "ping", "worker_id": "w 1", "note": "", "sent_at": 1.0}
    bad = msgpack.packb(body)

    with pytest.raises(ProtocolError) as caught:
        types.decode(bad)

    assert caught.value.reason == "bad_field"


def test_a_type_the_table_does_not_hold_is_unknown_on_decoding_and_refused_on_encoding(
    types: MessageTypes,
) -> None:
    hello = Hello("w1", 10, "cpu")

    with pytest.raises(UnknownMessageTypeError) as caught:
        types.decode(encode_message(hello))
    assert caught.value.reason == "unknown_type"
    with pytest.raises(TypeError):
        types.encode(hello)


def test_the_codec_table_is_untouched_by_a_table_of_its_own(types: MessageTypes) -> None:
    with pytest.raises(UnknownMessageTypeError):
        decode_message(types.encode(Ping("w1", "hi")))
    with pytest.raises(TypeError):
        encode_message(Ping("w1", "hi"))  # type: ignore[arg-type]


def test_a_name_or_a_dataclass_is_registered_once(types: MessageTypes) -> None:
    with pytest.raises(ValueError):
        types.register("ping", Hello, _encode_ping, _decode_ping)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        types.register("ping2", Ping, _encode_ping, _decode_ping)


def test_the_codec_table_holds_the_seven_types_of_protocol_1_and_their_size_limits() -> None:
    assert {entry.name for entry in MESSAGE_TYPES} == {
        "job",
        "model",
        "task",
        "update",
        "hello",
        "cancel",
        "failure",
    }
    assert dict(MAX_TYPE_BYTES) == {
        "job": 1 << 20,
        "hello": 64 * 1024,
        "cancel": 64 * 1024,
        "failure": 64 * 1024,
    }
