"""AMQP content headers built by hand: properties that RabbitMQ passes on and pika cannot decode.

Each is the encoded property list of a basic content header (flags, then the fields in the order
of AMQP 0-9-1), written byte by byte so that nothing in pika's encoder stands between the test and
the wire. RabbitMQ 3.10 takes every one of POISON from a publisher and delivers it unchanged;
pika 1.4 then raises while decoding the frame (OverflowError, ValueError, RecursionError) and
drops the connection. ODD are hard cases pika does decode: they must arrive as any message does.
Header values RabbitMQ itself refuses (an unknown type letter, a NaN or infinite float or double,
a table longer than the frame) close the publisher's connection and never reach a consumer.
"""

from __future__ import annotations

import struct
from typing import Any

import pika.spec

FLAG_CONTENT_TYPE = 1 << 15
FLAG_HEADERS = 1 << 13
FLAG_DELIVERY_MODE = 1 << 12
FLAG_MESSAGE_ID = 1 << 7
FLAG_TIMESTAMP = 1 << 6
FLAG_USER_ID = 1 << 4
BASIC_CLASS = 60
FRAME_HEADER = 2
FRAME_END = b"\xce"


def short_string(raw: bytes) -> bytes:
    """An AMQP short string: one length octet, then the bytes (not necessarily UTF-8)."""
    return bytes([len(raw)]) + raw


def table(*entries: tuple[bytes, bytes]) -> bytes:
    """An AMQP field table from (name, encoded value with its type letter) pairs."""
    body = b"".join(short_string(name) + value for name, value in entries)
    return struct.pack(">I", len(body)) + body


def timestamp(seconds: int) -> bytes:
    """A 'T' field value: unsigned 64-bit seconds since the epoch."""
    return b"T" + struct.pack(">Q", seconds)


def nested_arrays(depth: int) -> bytes:
    """An 'A' field value holding an array holding an array ... `depth` deep, a void inside."""
    value = b"V"
    for _ in range(depth):
        value = b"A" + struct.pack(">I", len(value)) + value
    return value


def properties(
    headers: bytes | None = None,
    user_id: str | None = None,
    timestamp_property: int | None = None,
    message_id: bytes | None = None,
    content_type: bytes | None = None,
) -> bytes:
    """Encoded basic properties: persistent, with these fields (headers as an encoded table)."""
    flags = FLAG_DELIVERY_MODE
    fields = b""
    if content_type is not None:
        flags |= FLAG_CONTENT_TYPE
        fields += short_string(content_type)
    if headers is not None:
        flags |= FLAG_HEADERS
        fields += headers
    fields += b"\x02"  # delivery_mode 2
    if message_id is not None:
        flags |= FLAG_MESSAGE_ID
        fields += short_string(message_id)
    if timestamp_property is not None:
        flags |= FLAG_TIMESTAMP
        fields += struct.pack(">Q", timestamp_property)
    if user_id is not None:
        flags |= FLAG_USER_ID
        fields += short_string(user_id.encode())
    return struct.pack(">H", flags) + fields


def header_frame(encoded_properties: bytes, body_size: int, channel: int = 1) -> bytes:
    """A whole content-header frame carrying these encoded properties."""
    payload = struct.pack(">HHQ", BASIC_CLASS, 0, body_size) + encoded_properties
    return struct.pack(">BHL", FRAME_HEADER, channel, len(payload)) + payload + FRAME_END


# name -> the headers table. Every one is delivered by RabbitMQ and breaks pika's decoder.
POISON: dict[str, bytes] = {
    "timestamp_2_pow_63": table((b"sent", timestamp(2**63))),
    "timestamp_in_year_10000": table((b"sent", timestamp(253_402_300_800))),
    "timestamp_in_an_array": table((b"times", b"A" + struct.pack(">I", 9) + timestamp(2**64 - 1))),
    "timestamp_in_a_nested_table": table((b"meta", b"F" + table((b"sent", timestamp(2**63))))),
    "arrays_5000_deep": table((b"deep", nested_arrays(5000))),
}

# name -> keyword arguments of properties(): odd, but pika decodes them.
ODD: dict[str, dict[str, Any]] = {
    "timestamp_property_2_pow_64_minus_1": {"timestamp_property": 2**64 - 1},
    "invalid_utf8_message_id_and_content_type": {
        "message_id": b"\xff\xfe",
        "content_type": b"\xc3(",
    },
    "invalid_utf8_header_name_and_value": {
        "headers": table((b"\xff", b"S" + struct.pack(">I", 2) + b"\xfe\xff")),
    },
    "decimal_with_exponent_minus_255": {
        "headers": table((b"d", b"D" + struct.pack(">Bi", 255, 2**31 - 1))),
    },
    "arrays_100_deep": {"headers": table((b"deep", nested_arrays(100)))},
}


class RawProperties(pika.spec.BasicProperties):  # type: ignore[misc]
    """Properties that pika publishes exactly as given, bytes for bytes."""

    def __init__(self, encoded: bytes) -> None:
        super().__init__()
        self._encoded = encoded

    def encode(self) -> list[bytes]:
        """The encoded property list, as pika's Header frame wants it."""
        return [self._encoded]
