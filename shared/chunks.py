"""Splitting large payloads into checksummed chunk messages and reassembling them."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgpack

from shared.errors import ChunkError
from shared.messages import PROTOCOL_VERSION

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
MAX_CHUNK_COUNT = 4096
K = TypeVar("K")
# The bytes after the map header of every envelope: "protocol": 1, "type": "chunk".
_PREFIX = b"".join(msgpack.packb(v) for v in ("protocol", PROTOCOL_VERSION, "type", "chunk"))


def is_chunk(payload: bytes) -> bool:
    """Tell cheaply whether an encoded payload is a chunk envelope (its `type` is "chunk")."""
    # Envelopes are written by split_payload with this exact prefix; anything else decodes whole.
    return payload[1 : 1 + len(_PREFIX)] == _PREFIX


def split_payload(payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """Return [payload] if it fits in chunk_size, else chunk envelopes that reassemble to it."""
    if chunk_size < 1024:
        raise ValueError("chunk_size must be at least 1 KiB")
    if len(payload) <= chunk_size:
        return [payload]
    count = -(-len(payload) // chunk_size)
    if count > MAX_CHUNK_COUNT:
        raise ChunkError(f"{len(payload)} bytes need more than {MAX_CHUNK_COUNT} chunks")
    message_id = uuid.uuid4().hex
    digest = hashlib.sha256(payload).digest()
    view = memoryview(payload)
    return [
        msgpack.packb(
            {
                "protocol": PROTOCOL_VERSION,
                "type": "chunk",
                "message_id": message_id,
                "index": index,
                "count": count,
                "total_size": len(payload),
                "sha256": digest,
                "data": view[index * chunk_size : (index + 1) * chunk_size],
            },
            use_bin_type=True,
        )
        for index in range(count)
    ]


@dataclass
class Chunk:
    """One decoded chunk envelope."""

    message_id: str
    index: int
    count: int
    total_size: int
    sha256: bytes
    data: bytes


def decode_chunk(payload: bytes) -> Chunk:
    """Decode and validate a chunk envelope."""
    try:
        body = msgpack.unpackb(payload, raw=False)
    except Exception as e:
        raise ChunkError(f"chunk is not msgpack: {e}") from e
    if not isinstance(body, dict) or body.get("type") != "chunk":
        raise ChunkError("not a chunk envelope")
    try:
        chunk = Chunk(
            message_id=body["message_id"],
            index=body["index"],
            count=body["count"],
            total_size=body["total_size"],
            sha256=body["sha256"],
            data=body["data"],
        )
    except KeyError as e:
        raise ChunkError(f"chunk lacks field {e}") from e
    ints = (chunk.index, chunk.count, chunk.total_size)
    if not all(type(v) is int for v in ints) or not isinstance(chunk.message_id, str):
        raise ChunkError("chunk fields have wrong types")
    if not isinstance(chunk.data, bytes) or not isinstance(chunk.sha256, bytes):
        raise ChunkError("chunk data and sha256 must be bin")
    if not 1 <= chunk.count <= MAX_CHUNK_COUNT or not 0 <= chunk.index < chunk.count:
        raise ChunkError(f"chunk index {chunk.index} of {chunk.count} is out of range")
    if len(chunk.sha256) != 32 or not 0 < len(chunk.data) <= chunk.total_size:
        raise ChunkError("chunk sizes or checksum length are inconsistent")
    return chunk


@dataclass
class _Partial(Generic[K]):
    count: int
    total_size: int
    sha256: bytes
    parts: dict[int, bytes] = field(default_factory=dict)
    keys: list[K] = field(default_factory=list)
    size: int = 0
    started: float = field(default_factory=time.monotonic)


class Reassembler(Generic[K]):
    """Collects chunks by message id; `add` returns the whole payload once its set is complete.

    Each chunk comes with a key (a delivery), so that the caller can settle every chunk of a
    message together. Memory is bounded: at most `max_pending_bytes` of incomplete sets are kept;
    `expire` hands back the keys of sets that are too old or pushed out.
    """

    def __init__(self, max_pending_bytes: int = 1 << 30, max_age_s: float = 600.0) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.max_age_s = max_age_s
        self._partials: OrderedDict[str, _Partial[K]] = OrderedDict()
        self._pending_bytes = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes held in incomplete chunk sets."""
        return self._pending_bytes

    def add(self, chunk: Chunk, key: K) -> tuple[bytes, list[K]] | None:
        """Add one chunk; return (payload, keys of all its chunks) when its set is complete.

        Raises ChunkError (after forgetting the set) if the set is inconsistent or its checksum
        fails; the error's `keys` attribute lists the chunks to reject.
        """
        partial = self._partials.get(chunk.message_id)
        if partial is None:
            if chunk.total_size > self.max_pending_bytes:
                raise _with_keys(ChunkError("chunk set larger than the reassembly limit"), [key])
            partial = _Partial(chunk.count, chunk.total_size, chunk.sha256)
            self._partials[chunk.message_id] = partial
        partial.keys.append(key)
        if (chunk.count, chunk.total_size, chunk.sha256) != (
            partial.count,
            partial.total_size,
            partial.sha256,
        ):
            raise self._fail(chunk.message_id, "chunk disagrees with its set on count or size")
        if chunk.index in partial.parts:
            # A redelivered duplicate: its bytes are already held.
            return None
        partial.parts[chunk.index] = chunk.data
        partial.size += len(chunk.data)
        self._pending_bytes += len(chunk.data)
        if partial.size > partial.total_size:
            raise self._fail(chunk.message_id, "chunks hold more bytes than the set's total size")
        if len(partial.parts) < partial.count:
            return None
        self._forget(chunk.message_id)
        payload = b"".join(partial.parts[i] for i in range(partial.count))
        if len(payload) != partial.total_size or hashlib.sha256(payload).digest() != partial.sha256:
            raise _with_keys(ChunkError("chunk set checksum mismatch"), partial.keys)
        return payload, partial.keys

    def expire(self, now: float | None = None) -> list[tuple[str, list[K]]]:
        """Forget incomplete sets that are too old or over the memory bound; return their keys."""
        now = time.monotonic() if now is None else now
        dropped: list[tuple[str, list[K]]] = []
        for message_id in list(self._partials):
            partial = self._partials[message_id]
            too_old = now - partial.started > self.max_age_s
            if too_old or self._pending_bytes > self.max_pending_bytes:
                self._forget(message_id)
                dropped.append((message_id, partial.keys))
        return dropped

    def _forget(self, message_id: str) -> _Partial[K]:
        partial = self._partials.pop(message_id)
        self._pending_bytes -= partial.size
        return partial

    def _fail(self, message_id: str, why: str) -> ChunkSetError:
        return _with_keys(ChunkError(why), self._forget(message_id).keys)


class ChunkSetError(ChunkError):
    """A chunk set failed; `keys` are the deliveries of its chunks, to be rejected together."""

    def __init__(self, message: str, keys: list[Any]) -> None:
        super().__init__(message)
        self.keys = keys


def _with_keys(error: ChunkError, keys: list[Any]) -> ChunkSetError:
    return ChunkSetError(str(error), keys)
