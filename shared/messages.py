"""Wire messages and their codec, by the names the services import.

shared/schema.py holds the message dataclasses and field constants, shared/codec.py the table of
message types with encode_message and decode_message, shared/msgpack_reader.py and
shared/msgpack_writer.py the msgpack under them (zero-copy reading within the size limits, and
writing with tensor data spliced in).
"""

from __future__ import annotations

from shared.codec import (
    MAX_TYPE_BYTES,
    MESSAGE_TYPES,
    MessageType,
    MessageTypes,
    _body,
    decode_message,
    encode_message,
)
from shared.msgpack_reader import MAX_MESSAGE_ITEMS, MAX_NON_TENSOR_BYTES, check_size
from shared.schema import (
    ID_PATTERN,
    MAX_FAILURE_DETAIL,
    MAX_METRICS,
    MAX_NUM_SAMPLES,
    PROTOCOL_VERSION,
    REASON_PATTERN,
    Cancel,
    Failure,
    GlobalModel,
    Hello,
    Job,
    Message,
    Task,
    Update,
)

__all__ = [
    "ID_PATTERN",
    "MAX_FAILURE_DETAIL",
    "MAX_MESSAGE_ITEMS",
    "MAX_METRICS",
    "MAX_NON_TENSOR_BYTES",
    "MAX_NUM_SAMPLES",
    "MAX_TYPE_BYTES",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "REASON_PATTERN",
    "Cancel",
    "Failure",
    "GlobalModel",
    "Hello",
    "Job",
    "Message",
    "MessageType",
    "MessageTypes",
    "Task",
    "Update",
    "_body",
    "check_size",
    "decode_message",
    "encode_message",
]
