"""The Transport every broker implementation provides, and the chunking layer they share."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.topology import DETAIL_HEADER, REASON_HEADER, SOURCE_HEADER, Topology
from shared.chunks import DEFAULT_CHUNK_SIZE, ChunkSetError, Reassembler, decode_chunk, is_chunk
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


RejectHook = Callable[[str], None]


class Transport(ABC):
    """Moves encoded messages: publish, receive whole messages, settle them; chunks large ones.

    Implementations provide the raw operations; this class splits payloads above `chunk_size`
    into checksummed chunks on publish and reassembles them on receive, so callers never see a
    chunk. Bad chunk sets are dead-lettered with their reason and reported to `on_reject`.
    """

    def __init__(self, topology: Topology, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.topology = topology
        self.chunk_size = chunk_size
        self.on_reject: RejectHook | None = None
        # The user_id every message is published with (None: not set); see stamp_user_id.
        self.user_id: str | None = None
        self._reassembler: Reassembler[RawMessage] = Reassembler()

    # -------------------------------------------------------------- implementation hooks

    @abstractmethod
    def declare(self) -> None:
        """Declare the shared topology (idempotent)."""

    @abstractmethod
    def declare_worker(self, worker_id: str) -> None:
        """Declare one worker's task queue and its binding (idempotent)."""

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
        """Acknowledge a delivery: the broker forgets it."""
        for handle in delivery.handles:
            self._settle_raw(handle, ack=True, requeue=False)

    def nack(self, delivery: Delivery, requeue: bool = True) -> None:
        """Give a delivery back to its queue (requeue) or drop it to the queue's dead-letter."""
        for handle in delivery.handles:
            self._settle_raw(handle, ack=False, requeue=requeue)

    def reject(self, delivery: Delivery, reason: str, detail: str = "") -> None:
        """Dead-letter a delivery with its reason in a header, then ack it: nothing is lost."""
        self.dead_letter(delivery.body, delivery.queue, reason, delivery.headers, detail)
        self.ack(delivery)

    def dead_letter(
        self,
        body: bytes,
        queue: str,
        reason: str,
        headers: dict[str, Any] | None = None,
        detail: str = "",
    ) -> None:
        """Publish a copy of a rejected message to the dead exchange with its reason."""
        extra = {REASON_HEADER: reason, SOURCE_HEADER: queue}
        if detail:
            extra[DETAIL_HEADER] = detail[:500]
        self.publish(self.topology.dead, "", body, dict(headers or {}) | extra)
        if self.on_reject is not None:
            self.on_reject(reason)

    # -------------------------------------------------------------- chunks

    def _add_chunk(self, raw: RawMessage) -> Delivery | None:
        try:
            done = self._reassembler.add(decode_chunk(raw.body), raw)
        except ChunkSetError as e:
            logger.warning("rejecting a chunk set from %s: %s", raw.queue, e)
            self._reject_raws(e.keys, e.reason)
            return None
        except ChunkError as e:
            logger.warning("rejecting a chunk from %s: %s", raw.queue, e)
            self._reject_raws([raw], e.reason)
            return None
        if done is None:
            return None
        payload, raws = done
        first = raws[0]
        return Delivery(
            payload,
            first.queue,
            [r.handle for r in raws],
            first.headers,
            any(r.redelivered for r in raws),
            first.user_id,
        )

    def _expire_chunks(self) -> None:
        for message_id, raws in self._reassembler.expire():
            logger.warning("chunk set %s incomplete for too long; dead-lettering it", message_id)
            self._reject_raws(raws, "incomplete_chunks")

    def _reject_raws(self, raws: list[RawMessage], reason: str) -> None:
        for index, raw in enumerate(raws):
            extra = {REASON_HEADER: reason, SOURCE_HEADER: raw.queue}
            self._publish_raw(self.topology.dead, "", raw.body, raw.headers | extra)
            self._settle_raw(raw.handle, ack=True, requeue=False)
            if index == 0 and self.on_reject is not None:
                self.on_reject(reason)
