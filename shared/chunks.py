"""Splitting large payloads into checksummed chunk messages and reassembling them."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
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
    started: float
    last: float
    # index -> the chunk's data, or (with a loader) the key to read it back through.
    parts: dict[int, Any] = field(default_factory=dict)
    keys: list[K] = field(default_factory=list)
    size: int = 0


# Refused sets are remembered (this many, the newest) so that their later envelopes are
# dead-lettered with the same reason, without counting the set again.
_REFUSED_MEMORY = 4096


class Reassembler(Generic[K]):
    """Collects chunks by sender and message id; `add` returns the whole payload once its set
    is complete.

    Each chunk comes with a key (what the caller needs to dead-letter it later) and its sender.
    A set is its sender's alone: an envelope from another sender with the same message id is
    another set (it can neither complete, corrupt nor claim the first).
    The limits (docs/protocol.md section 7.3) are checked when a set starts, never by pushing out
    sets that are already held: a set whose `total_size` is above `max_set_bytes` is refused as
    `too_large`; one that would give its sender more than `max_sets_per_sender` incomplete sets
    or `max_bytes_per_sender` of their declared sizes, or all senders together more than
    `max_sets` sets or `max_pending_bytes`, is refused as `chunk_limit`. `expire` hands back the
    keys of sets older than `max_age_s`, or that got no envelope for `idle_s`.

    With `load` set (a function from a key to its chunk's data), chunk data is not kept in
    memory: it is read back through `load` when the set completes (the caller holds the
    envelopes anyway, in a spool or in memory).
    """

    def __init__(
        self,
        max_pending_bytes: int = 1 << 30,
        max_age_s: float = 600.0,
        max_sets: int = 256,
        max_set_bytes: int | None = None,
        max_sets_per_sender: int | None = None,
        max_bytes_per_sender: int | None = None,
        idle_s: float | None = None,
    ) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.max_age_s = max_age_s
        self.max_sets = max_sets
        self.max_set_bytes = max_pending_bytes if max_set_bytes is None else max_set_bytes
        self.max_sets_per_sender = max_sets if max_sets_per_sender is None else max_sets_per_sender
        self.max_bytes_per_sender = (
            max_pending_bytes if max_bytes_per_sender is None else max_bytes_per_sender
        )
        self.idle_s = max_age_s if idle_s is None else idle_s
        self.load: Callable[[K], bytes] | None = None
        self._partials: OrderedDict[tuple[str, str], _Partial[K]] = OrderedDict()
        self._refused: OrderedDict[tuple[str, str], ChunkError] = OrderedDict()
        # sender -> [incomplete sets, their declared bytes]
        self._senders: dict[str, list[int]] = {}
        self._pending_bytes = 0
        self._reserved_bytes = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes received so far for incomplete chunk sets."""
        return self._pending_bytes

    @property
    def pending_sets(self) -> int:
        """Incomplete chunk sets held."""
        return len(self._partials)

    def holds(self, chunk: Chunk, sender: str = "") -> bool:
        """Whether this envelope's index of its sender's set is already held (a redelivery)."""
        partial = self._partials.get((sender, chunk.message_id))
        return partial is not None and chunk.index in partial.parts

    def add(
        self, chunk: Chunk, key: K, started: float | None = None, sender: str = ""
    ) -> tuple[bytes, list[K]] | None:
        """Add one chunk; return (payload, keys of all its chunks) when its set is complete.

        Raises ChunkSetError (after forgetting the set) if the set is refused, inconsistent or
        its checksum fails; the error's `keys` lists the chunks to dead-letter and `first` says
        whether this is the first error of the set (to be counted once). `started` backdates a
        new set (a set restored from disk keeps its age). Sets are keyed by (sender, message
        id): envelopes of other senders never join a set.
        """
        set_key = (sender, chunk.message_id)
        refused = self._refused.get(set_key)
        if refused is not None:
            raise ChunkSetError(str(refused), [key], refused.reason, first=False)
        now = time.monotonic()
        partial = self._partials.get(set_key)
        if partial is None:
            self._admit(chunk, key, sender)
            when = now if started is None else started
            partial = _Partial(chunk.count, chunk.total_size, chunk.sha256, when, now)
            self._partials[set_key] = partial
            self._reserved_bytes += chunk.total_size
            tally = self._senders.setdefault(sender, [0, 0])
            tally[0] += 1
            tally[1] += chunk.total_size
        partial.keys.append(key)
        partial.last = now
        if (chunk.count, chunk.total_size, chunk.sha256) != (
            partial.count,
            partial.total_size,
            partial.sha256,
        ):
            raise self._fail(set_key, "chunk disagrees with its set on count or size")
        if chunk.index in partial.parts:
            # A redelivered duplicate: its bytes are already held.
            return None
        partial.parts[chunk.index] = chunk.data if self.load is None else key
        partial.size += len(chunk.data)
        self._pending_bytes += len(chunk.data)
        if partial.size > partial.total_size:
            raise self._fail(set_key, "chunks hold more bytes than the set's total size")
        if len(partial.parts) < partial.count:
            return None
        self._forget(set_key)
        payload = self._join(partial)
        if len(payload) != partial.total_size or hashlib.sha256(payload).digest() != partial.sha256:
            raise ChunkSetError("chunk set checksum mismatch", partial.keys)
        return payload, partial.keys

    def _join(self, partial: _Partial[K]) -> bytes:
        """The set's data in index order, read back through `load` if it was not kept."""
        load = self.load
        if load is None:
            return b"".join(partial.parts[i] for i in range(partial.count))
        try:
            return b"".join([load(partial.parts[i]) for i in range(partial.count)])
        except ChunkError as e:
            raise ChunkSetError(f"cannot read a chunk of the set back: {e}", partial.keys) from e

    def _admit(self, chunk: Chunk, key: K, sender: str) -> None:
        """Refuse a new set that is over a limit (and remember it), else return."""
        error = self._over_limit(chunk, sender)
        if error is None:
            return
        self._refused[(sender, chunk.message_id)] = error
        while len(self._refused) > _REFUSED_MEMORY:
            self._refused.popitem(last=False)
        raise ChunkSetError(str(error), [key], error.reason)

    def _over_limit(self, chunk: Chunk, sender: str) -> ChunkError | None:
        # The sender's own bounds come first: a sender past them is refused its new sets, and
        # cannot take the room all senders share (nor push out a set already held).
        sets, declared = self._senders.get(sender, (0, 0))
        if chunk.total_size > self.max_set_bytes:
            return ChunkError(
                f"chunk set of {chunk.total_size} bytes exceeds the largest message "
                f"({self.max_set_bytes} bytes)",
                "too_large",
            )
        if sets >= self.max_sets_per_sender:
            why = (
                f"sender {sender!r} holds {sets} incomplete chunk sets "
                f"(max {self.max_sets_per_sender})"
            )
        elif declared + chunk.total_size > self.max_bytes_per_sender:
            why = (
                f"a set of {chunk.total_size} bytes would take sender {sender!r}'s incomplete "
                f"sets past {self.max_bytes_per_sender} bytes"
            )
        elif len(self._partials) >= self.max_sets:
            why = f"{len(self._partials)} incomplete chunk sets are held (max {self.max_sets})"
        elif self._reserved_bytes + chunk.total_size > self.max_pending_bytes:
            why = (
                f"a set of {chunk.total_size} bytes would take incomplete sets past "
                f"{self.max_pending_bytes} bytes"
            )
        else:
            return None
        return ChunkError(why, "chunk_limit")

    def expire(self, now: float | None = None) -> list[tuple[str, str, list[K], str]]:
        """Forget incomplete sets older than max_age_s or idle for idle_s; return each one's
        sender, message id, keys and why."""
        now = time.monotonic() if now is None else now
        dropped: list[tuple[str, str, list[K], str]] = []
        for set_key in list(self._partials):
            partial = self._partials[set_key]
            if now - partial.started > self.max_age_s:
                why = f"incomplete after {self.max_age_s:g} s"
            elif now - partial.last > self.idle_s:
                why = f"no envelope of the set for {self.idle_s:g} s"
            else:
                continue
            sender, message_id = set_key
            dropped.append((sender, message_id, self._forget(set_key).keys, why))
        return dropped

    def _forget(self, set_key: tuple[str, str]) -> _Partial[K]:
        partial = self._partials.pop(set_key)
        self._pending_bytes -= partial.size
        self._reserved_bytes -= partial.total_size
        sender = set_key[0]
        tally = self._senders[sender]
        tally[0] -= 1
        tally[1] -= partial.total_size
        if tally[0] == 0:
            del self._senders[sender]
        return partial

    def _fail(self, set_key: tuple[str, str], why: str) -> ChunkSetError:
        return ChunkSetError(why, self._forget(set_key).keys)


class ChunkSetError(ChunkError):
    """A chunk set failed or was refused; `keys` are the chunks to dead-letter together.

    `first` is False for a later envelope of a set already refused (counted once, not again).
    """

    def __init__(
        self, message: str, keys: list[Any], reason: str = "bad_chunk", first: bool = True
    ) -> None:
        super().__init__(message, reason)
        self.keys = keys
        self.first = first
