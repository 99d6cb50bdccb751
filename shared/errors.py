"""The one exception tree of fedq: every error the project raises derives from FedqError."""

from __future__ import annotations


class FedqError(Exception):
    """Base of every error fedq raises on purpose."""


class ConfigError(FedqError):
    """Settings, a job file or a command-line flag are invalid."""


class ProtocolError(FedqError):
    """A message could not be decoded or failed validation; `reason` is a short stable code."""

    reason: str = "malformed"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class MalformedMessageError(ProtocolError):
    """The bytes are not a msgpack map of the expected shape."""

    reason = "malformed"


class UnsupportedVersionError(ProtocolError):
    """The message carries a protocol version this build does not speak."""

    reason = "protocol_version"


class UnknownMessageTypeError(ProtocolError):
    """The message's `type` is not one this build knows."""

    reason = "unknown_type"


class FieldError(ProtocolError):
    """A field is missing, has the wrong type or an out-of-range value."""

    reason = "bad_field"


class TensorError(ProtocolError):
    """A tensor entry is invalid: dtype, shape, length or values."""

    reason = "bad_tensor"


class MessageTooLargeError(ProtocolError):
    """A message is larger than its type allows, or holds more msgpack items than any message."""

    reason = "too_large"


class ChunkError(ProtocolError):
    """A chunk is invalid or a chunk set cannot be reassembled (checksum, count, size)."""

    reason = "bad_chunk"


class TransportError(FedqError):
    """The message transport failed (connection lost, publish not confirmed, ...)."""


class PublishError(TransportError):
    """A publish was not confirmed by the broker (nacked or unroutable)."""


class UnroutableError(PublishError):
    """No queue is bound for a published message (a worker id without a task queue)."""


class ConnectionLostError(TransportError):
    """The connection to the broker was lost and could not be re-established in time."""


class RegistryError(FedqError):
    """A model or data set name could not be resolved."""


class ReferenceNotAllowedError(RegistryError):
    """A `package.module:function` reference names code outside the service's allowed_modules;
    nothing of it was imported or called."""


class DatasetError(FedqError):
    """Local data could not be loaded or partitioned."""


class DataMismatchError(DatasetError):
    """A worker's local data does not fit the model of a task (input shape, labels, output)."""
