"""The Transport every broker implementation provides, and the chunking layer they share."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from broker.spool import ChunkSpool, monotonic_of
from broker.topology import (
    DETAIL_HEADER,
    REASON_HEADER,
    RESERVED_HEADER_PREFIX,
    SENDER_HEADER,
    SOURCE_HEADER,
    USER_ID_HEADER,
    Topology,
)
from shared.chunks import (
    DEFAULT_CHUNK_SIZE,
    Chunk,
    ChunkSetError,
    Reassembler,
    decode_chunk,
    is_chunk,
)
from shared.errors import ChunkError

logger = logging.getLogger(__name__)


@dataclass
class Delivery:
    """One whole message taken from a queue; `handles` settle it (several if it came in chunks)."""

    body: bytes
    queue: str
    handles: list[Any]
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    user_id: str | None = None


@dataclass
class RawMessage:
    """One message as an implementation receives it, before reassembly."""

    body: bytes
    queue: str
    handle: Any
    headers: dict[str, Any]
    redelivered: bool = False
    user_id: str | None = None


@dataclass
class _Held:
    """An envelope of an incomplete chunk set: acked on the broker, kept here for its set.

    Its body is in memory, or (body empty) in the spool at `path`.
    """

    body: bytes
    queue: str
    headers: dict[str, Any]
    user_id: str | None
    redelivered: bool
    path: Path | None = None


@dataclass(frozen=True)
class _SetHandle:
    """Settles a reassembled message, whose envelopes were each acked as they arrived."""

    message_id: str
    sender: str


# What a refused message is when it is settled: taken whole, taken raw, or a held envelope.
_Refused = Delivery | RawMessage | _Held
RejectHook = Callable[[str], None]
MAX_DETAIL = 500


def _handles(message: _Refused) -> list[Any]:
    """The handles that settle a refused message (a held envelope is acked already: none)."""
    if isinstance(message, Delivery):
        return message.handles
    return [message.handle] if isinstance(message, RawMessage) else []


def dead_letter_headers(
    headers: dict[str, Any], reason: str, queue: str, detail: str = "", user_id: str | None = None
) -> dict[str, Any]:
    """The headers of a service's dead-lettered copy: the sender's own, less every x- header
    (a sender could forge x-fedq-reason or x-death), plus the reason, the source queue, the
    detail and the sender's broker-validated user_id (docs/protocol.md 1.3)."""
    # A key that is not valid UTF-8 reaches us as bytes (pika): never one of ours, and it may
    # not encode again, so it goes with the x- ones.
    kept = {
        k: v
        for k, v in headers.items()
        if isinstance(k, str) and not k.startswith(RESERVED_HEADER_PREFIX)
    }
    kept |= {REASON_HEADER: reason, SOURCE_HEADER: queue}
    if detail:
        kept[DETAIL_HEADER] = detail[:MAX_DETAIL]
    if user_id:
        kept[USER_ID_HEADER] = user_id
    return kept


class Transport(ABC):
    """Moves encoded messages: publish, receive whole messages, settle them; chunks large ones.

    Implementations provide the raw operations; this class splits payloads above `chunk_size`
    into checksummed chunks on publish and reassembles them on receive, so callers never see a
    chunk. Bad chunk sets are dead-lettered with their reason and reported to `on_reject`.

    Each chunk envelope is acked as soon as it is held (in memory, or durably in a ChunkSpool
    given to hold_chunks), so that sets larger than the prefetch never stall the consumer; the
    reassembled message is settled as one delivery (docs/protocol.md section 7.3).
    """

    def __init__(self, topology: Topology, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.topology = topology
        self.chunk_size = chunk_size
        self.on_reject: RejectHook | None = None
        # True for a worker, whose account may not write the dead exchange: what it rejects is
        # nacked without requeue, and RabbitMQ dead-letters it through the queue's
        # x-dead-letter-exchange with an x-death header no client can write for it.
        self.dead_letters_by_broker = False
        # The user_id every message is published with (None: not set); see stamp_user_id.
        self.user_id: str | None = None
        self._reassembler: Reassembler[_Held] = Reassembler()
        self._reassembler.load = self._chunk_data
        self._validated_senders = False
        self._spool: ChunkSpool | None = None
        self._spool_resumed = False
        # Reassembled messages to hand out before the broker's: requeued or restored ones.
        self._ready: deque[Delivery] = deque()

    # -------------------------------------------------------------- implementation hooks

    @abstractmethod
    def declare(self) -> None:
        """Declare the shared topology (idempotent)."""

    @abstractmethod
    def declare_worker(self, worker_id: str) -> None:
        """Declare one worker's task queue and its binding (idempotent)."""

    @abstractmethod
    def exchange_exists(self, exchange: str) -> bool:
        """Whether an exchange is declared (a passive check: needs no permission on it)."""

    @abstractmethod
    def subscribe(self, queue: str) -> None:
        """Start consuming from a queue; receive() then returns its messages."""

    @abstractmethod
    def _publish_raw(
        self, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any]
    ) -> None:
        """Publish one message durably and wait for the broker's confirmation."""

    @abstractmethod
    def _receive_raw(self, timeout: float) -> RawMessage | None:
        """Return the next message of a subscribed queue, or None after `timeout` seconds."""

    @abstractmethod
    def _settle_raw(self, handle: Any, ack: bool, requeue: bool) -> None:
        """Ack, or nack with or without requeue, one raw message."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; unsettled messages go back to their queues."""

    @abstractmethod
    def teardown(self, worker_ids: list[str]) -> None:
        """Delete this topology's queues and exchanges (a throw-away run's clean-up)."""

    @abstractmethod
    def purge(self, queue: str) -> int:
        """Drop every ready message of a queue (tests and operators); return how many."""

    # -------------------------------------------------------------- public operations

    def publish(
        self, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any] | None = None
    ) -> None:
        """Publish a message, in chunks if it is larger than chunk_size; return once confirmed."""
        from shared.chunks import split_payload

        for part in split_payload(body, self.chunk_size):
            self._publish_raw(exchange, routing_key, part, dict(headers or {}))

    def receive(self, timeout: float) -> Delivery | None:
        """Return the next whole message of a subscribed queue, or None if none came in time."""
        # Expiry runs on every call, not only when the queue is idle: under steady traffic an
        # incomplete set would otherwise hold its chunks (and the prefetch) indefinitely.
        self._expire_chunks()
        if self._ready:
            return self._ready.popleft()
        raw = self._receive_raw(timeout)
        while raw is not None:
            # The dead queue is read as it is: a bad chunk set dead-lettered again would loop.
            if not is_chunk(raw.body) or raw.queue == self.topology.dead:
                return Delivery(
                    raw.body, raw.queue, [raw.handle], raw.headers, raw.redelivered, raw.user_id
                )
            whole = self._add_chunk(raw)
            if whole is not None:
                return whole
            raw = self._receive_raw(0)
        return None

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a delivery: the broker (or the chunk spool) forgets it."""
        for handle in delivery.handles:
            if isinstance(handle, _SetHandle):
                self._drop_set(handle.message_id, handle.sender)
            else:
                self._settle_raw(handle, ack=True, requeue=False)

    def nack(self, delivery: Delivery, requeue: bool = True) -> None:
        """Give a delivery back to its queue (requeue) or drop it to the queue's dead-letter."""
        for handle in delivery.handles:
            if not isinstance(handle, _SetHandle):
                self._settle_raw(handle, ack=False, requeue=requeue)
            elif requeue:
                # Its envelopes are acked: it waits here, not in the queue, to be received again.
                self._ready.append(replace(delivery, redelivered=True))
            else:
                # Its envelopes are acked, so the broker cannot dead-letter it any more.
                self._refuse([delivery], "rejected", count=False)

    def reject(self, delivery: Delivery, reason: str, detail: str = "") -> None:
        """Dead-letter a delivery with its reason in a header, then ack it: nothing is lost.

        With dead_letters_by_broker, nack it without requeue instead: the broker dead-letters
        it with x-death, and the reason stays with the caller (its log and metrics)."""
        self._refuse([delivery], reason, detail)

    def _refuse(
        self, messages: Sequence[_Refused], reason: str, detail: str = "", count: bool = True
    ) -> None:
        """Settle refused messages as dead letters; report the refusal to on_reject if `count`.

        Our copy of each, with the reason headers, is published to the dead exchange before
        the original is acked. With dead_letters_by_broker (this account may not write the
        dead exchange) an original still open on the broker is nacked without requeue instead,
        so that RabbitMQ dead-letters it with x-death; one already acked (a held chunk envelope,
        or the message its set made) cannot be, and is dropped with a warning.
        """
        by_broker = self.dead_letters_by_broker
        dropped = 0
        for message in messages:
            handles = _handles(message)
            if not by_broker:
                self._publish_dead_letter(message, reason, detail)
            elif all(isinstance(handle, _SetHandle) for handle in handles):
                dropped += 1
            for handle in handles:
                if isinstance(handle, _SetHandle):
                    self._drop_set(handle.message_id, handle.sender)
                else:
                    self._settle_raw(handle, ack=not by_broker, requeue=False)
        # Logged once: a later envelope of a set refused already (not counted) was logged with it.
        if dropped and (count or isinstance(messages[0], Delivery)):
            logger.warning(
                "dropping %d chunk envelopes or chunked messages from %s (%s: %s): they are "
                "acked, and this account cannot write the dead exchange",
                dropped,
                messages[0].queue,
                reason,
                detail,
            )
        if count and self.on_reject is not None:
            self.on_reject(reason)

    def _publish_dead_letter(self, message: _Refused, reason: str, detail: str) -> None:
        """Publish our copy of a refused message, with dead_letter_headers, to the dead exchange."""
        body = message.body
        if isinstance(message, _Held) and message.path is not None and self._spool is not None:
            try:
                body = self._spool.read(message.path).body
            except OSError as e:
                logger.warning("spooled chunk %s is gone: %r", message.path, e)
                return
        headers = dead_letter_headers(
            message.headers, reason, message.queue, detail, message.user_id
        )
        # A reassembled message may need chunks again; an envelope or raw message goes as it came.
        publish = self.publish if isinstance(message, Delivery) else self._publish_raw
        publish(self.topology.dead, "", body, headers)

    # -------------------------------------------------------------- chunks

    def hold_chunks(
        self,
        reassembler: Reassembler[Any],
        spool: ChunkSpool | None = None,
        validated_senders: bool = False,
    ) -> None:
        """Reassemble with these limits; with a spool, keep envelopes durably until settled.

        A chunk set's sender (whose limits it counts against) is the broker-validated user_id
        of its envelopes; where there is none, with `validated_senders` every such set is one
        anonymous sender's, else the sender is the worker id claimed in SENDER_HEADER.
        """
        reassembler.load = self._chunk_data
        self._reassembler = reassembler
        self._spool = spool
        self._spool_resumed = False
        self._validated_senders = validated_senders

    def resume_spool(self) -> int:
        """Take back the sets a previous run left in the spool (once); return how many
        envelopes. Sets found complete are received again, marked redelivered."""
        if self._spool is None or self._spool_resumed:
            return 0
        self._spool_resumed = True
        found = self._spool.load()
        for path, envelope in found:
            try:
                chunk = decode_chunk(envelope.body)
            except ChunkError:
                path.unlink(missing_ok=True)  # only valid envelopes are ever spooled
                continue
            held = _Held(b"", envelope.queue, envelope.headers, envelope.user_id, True, path)
            if self._reassembler.holds(chunk, self._sender(held)):
                continue
            whole = self._hold(chunk, held, monotonic_of(envelope.written_at))
            if whole is not None:
                self._ready.append(whole)
        if found:
            logger.info("took back %d spooled chunk envelopes", len(found))
        return len(found)

    def chunk_backlog(self) -> tuple[int, int]:
        """Incomplete chunk sets held and their bytes held so far."""
        return self._reassembler.pending_sets, self._reassembler.pending_bytes

    def _add_chunk(self, raw: RawMessage) -> Delivery | None:
        try:
            chunk = decode_chunk(raw.body)
        except ChunkError as e:
            logger.warning("rejecting a chunk from %s: %s", raw.queue, e)
            self._refuse([raw], e.reason, str(e))
            return None
        held = _Held(raw.body, raw.queue, raw.headers, raw.user_id, raw.redelivered)
        if self._reassembler.holds(chunk, self._sender(held)):
            # A redelivery of an envelope already held (its ack was lost): settle it again.
            self._settle_raw(raw.handle, ack=True, requeue=False)
            return None
        whole = self._hold(chunk, held)
        # Held (durably, with a spool): the broker may forget it, whatever the set's size.
        self._settle_raw(raw.handle, ack=True, requeue=False)
        return whole

    def _sender(self, held: _Held) -> str:
        """Whose quota an envelope's set counts against (see hold_chunks)."""
        if held.user_id is not None or self._validated_senders:
            return held.user_id or ""
        claimed = held.headers.get(SENDER_HEADER)
        return claimed[:128] if isinstance(claimed, str) else ""

    def _chunk_data(self, held: _Held) -> bytes:
        """The data of a held envelope, from memory or the spool (the reassembler keeps none)."""
        body = held.body
        if held.path is not None and self._spool is not None:
            try:
                body = self._spool.read(held.path).body
            except (OSError, ValueError, KeyError) as e:
                raise ChunkError(f"spooled chunk {held.path} cannot be read: {e!r}") from e
        return decode_chunk(body).data

    def _hold(self, chunk: Chunk, held: _Held, started: float | None = None) -> Delivery | None:
        """Add an envelope to its sender's set; return the message if it completed the set."""
        sender = self._sender(held)
        try:
            done = self._reassembler.add(chunk, held, started, sender)
        except ChunkSetError as e:
            if e.first:
                logger.warning(
                    "rejecting chunk set %s from %s: %s", chunk.message_id, held.queue, e
                )
            self._refuse(e.keys, e.reason, str(e), count=e.first)
            self._drop_set(chunk.message_id, sender)
            return None
        if held.path is None and self._spool is not None:
            held.path = self._spool.save(
                chunk.message_id,
                chunk.index,
                held.body,
                held.queue,
                held.headers,
                held.user_id,
                sender,
            )
            held.body = b""
        if done is None:
            return None
        payload, helds = done
        first = helds[0]
        return Delivery(
            payload,
            first.queue,
            [_SetHandle(chunk.message_id, sender)],
            first.headers,
            any(h.redelivered for h in helds),
            first.user_id,
        )

    def _drop_set(self, message_id: str, sender: str) -> None:
        if self._spool is not None:
            self._spool.drop(message_id, sender)

    def _expire_chunks(self) -> None:
        for sender, message_id, helds, detail in self._reassembler.expire():
            logger.warning("chunk set %s dead-lettered: %s", message_id, detail)
            self._refuse(helds, "incomplete_chunks", detail)
            self._drop_set(message_id, sender)
