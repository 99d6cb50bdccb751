"""The in-process broker: the embedded default, with the same routing and settling semantics."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from broker.topology import DEATH_HEADER, JOB_ROUTING_KEY, UPDATE_ROUTING_KEY, Topology
from broker.transport import RawMessage, Transport
from shared.chunks import DEFAULT_CHUNK_SIZE
from shared.errors import PublishError, TransportError, UnroutableError


@dataclass
class _Queued:
    body: bytes
    headers: dict[str, Any]
    redelivered: bool = False
    user_id: str | None = None
    exchange: str = ""
    routing_key: str = ""


@dataclass
class _Exchange:
    kind: str
    bindings: dict[str, set[str]] = field(default_factory=dict)


class MemoryBroker:
    """Exchanges, queues and bindings in one process, shared by the transports connected to it."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._exchanges: dict[str, _Exchange] = {}
        self._queues: dict[str, deque[_Queued]] = {}
        # A queue's x-dead-letter-exchange, where a message rejected without requeue goes.
        self._dead_letter_exchanges: dict[str, str] = {}

    def declare_exchange(self, name: str, kind: str) -> None:
        """Create an exchange of kind direct or fanout if it does not exist."""
        with self._lock:
            self._exchanges.setdefault(name, _Exchange(kind))

    def has_exchange(self, name: str) -> bool:
        """Whether an exchange is declared."""
        with self._lock:
            return name in self._exchanges

    def declare_queue(self, name: str, dead_letter_exchange: str = "") -> None:
        """Create a queue if it does not exist, with the exchange its rejects go to (if any)."""
        with self._lock:
            if name not in self._queues:
                self._queues[name] = deque()
                if dead_letter_exchange:
                    self._dead_letter_exchanges[name] = dead_letter_exchange

    def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        """Route messages of an exchange with this key (any key for fanout) to a queue."""
        with self._lock:
            self._exchanges[exchange].bindings.setdefault(routing_key, set()).add(queue)

    def route(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any],
        user_id: str | None = None,
    ) -> None:
        """Put a message on every bound queue; raise PublishError if none (mandatory)."""
        with self._lock:
            ex = self._exchanges.get(exchange)
            if ex is None:
                raise PublishError(f"no exchange {exchange!r}")
            if ex.kind == "fanout":
                targets = set().union(*ex.bindings.values()) if ex.bindings else set()
            else:
                targets = ex.bindings.get(routing_key, set())
            if not targets:
                raise UnroutableError(f"message to {exchange!r}/{routing_key!r} is unroutable")
            for queue in targets:
                queued = _Queued(body, headers, False, user_id, exchange, routing_key)
                self._queues[queue].append(queued)
            self._lock.notify_all()

    def take(self, queues: list[str], timeout: float) -> tuple[str, _Queued] | None:
        """Pop the first message of any of the queues, waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for queue in queues:
                    pending = self._queues.get(queue)
                    if pending:
                        return queue, pending.popleft()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(remaining)

    def give_back(self, queue: str, message: _Queued) -> None:
        """Requeue a message at the head of its queue, marked redelivered."""
        with self._lock:
            message.redelivered = True
            self._queues[queue].appendleft(message)
            self._lock.notify_all()

    def dead_letter(self, queue: str, message: _Queued) -> None:
        """Route a message rejected without requeue to its queue's dead-letter exchange with an
        x-death header, as RabbitMQ does; drop it if the queue has none or nothing is bound."""
        with self._lock:
            exchange = self._dead_letter_exchanges.get(queue)
            if exchange is None:
                return
            headers = with_death(message.headers, queue, "rejected", message)
            # RabbitMQ drops a dead letter that its exchange cannot route.
            with contextlib.suppress(PublishError):
                self.route(exchange, message.routing_key, message.body, headers, message.user_id)

    def depth(self, queue: str) -> int:
        """Messages ready in a queue."""
        with self._lock:
            return len(self._queues.get(queue, ()))

    def delete(self, queues: list[str], exchanges: list[str]) -> None:
        """Forget queues (with their messages) and exchanges."""
        with self._lock:
            for queue in queues:
                self._queues.pop(queue, None)
                self._dead_letter_exchanges.pop(queue, None)
            for exchange in exchanges:
                self._exchanges.pop(exchange, None)
            for ex in self._exchanges.values():
                for bound in ex.bindings.values():
                    bound.difference_update(queues)

    def purge(self, queue: str) -> int:
        """Drop the ready messages of a queue; return how many."""
        with self._lock:
            pending = self._queues.get(queue, deque())
            count = len(pending)
            pending.clear()
            return count


def with_death(
    headers: dict[str, Any], queue: str, reason: str, message: _Queued
) -> dict[str, Any]:
    """The headers with RabbitMQ's x-death record of one more dead-lettering: the entry of
    this (queue, reason) counted up and moved first, or a new one; x-first-death-* once."""
    deaths = [dict(d) for d in headers.get(DEATH_HEADER) or [] if isinstance(d, dict)]
    same = [d for d in deaths if (d.get("queue"), d.get("reason")) == (queue, reason)]
    entry = {
        "queue": queue,
        "reason": reason,
        "count": int(same[0].get("count", 0)) + 1 if same else 1,
        "exchange": message.exchange,
        "routing-keys": [message.routing_key],
        "time": time.time(),
    }
    first = {
        "x-first-death-queue": queue,
        "x-first-death-reason": reason,
        "x-first-death-exchange": message.exchange,
    }
    rest = [d for d in deaths if d not in same]
    return first | headers | {DEATH_HEADER: [entry, *rest]}


class MemoryTransport(Transport):
    """A Transport over a MemoryBroker: the embedded default for a federation in one process."""

    def __init__(
        self,
        broker: MemoryBroker,
        topology: Topology,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        user: str | None = None,
    ) -> None:
        super().__init__(topology, chunk_size)
        self.broker = broker
        # Simulates RabbitMQ's validated user_id: every message published is stamped with it.
        self.user_id = user
        self._subscribed: list[str] = []
        self._unacked: dict[int, tuple[str, _Queued]] = {}
        self._tags = itertools.count(1)
        self._closed = False

    def declare(self) -> None:
        """Declare jobs, updates and dead exchanges and queues."""
        t, b = self.topology, self.broker
        for name, kind, key, dead_letter_exchange in (
            (t.jobs, "direct", JOB_ROUTING_KEY, t.dead),
            (t.updates, "direct", UPDATE_ROUTING_KEY, t.dead),
            (t.dead, "fanout", "", ""),  # the end of the line, as on RabbitMQ
        ):
            b.declare_exchange(name, kind)
            b.declare_queue(name, dead_letter_exchange)
            b.bind(name, name, key)
        b.declare_exchange(t.tasks, "direct")

    def declare_worker(self, worker_id: str) -> None:
        """Declare a worker's task queue bound by its id."""
        queue = self.topology.task_queue(worker_id)
        self.broker.declare_exchange(self.topology.tasks, "direct")
        self.broker.declare_queue(queue, self.topology.dead)
        self.broker.bind(queue, self.topology.tasks, worker_id)

    def exchange_exists(self, exchange: str) -> bool:
        """Whether the exchange is declared on the in-process broker."""
        return self.broker.has_exchange(exchange)

    def subscribe(self, queue: str) -> None:
        """Consume from a queue."""
        self.broker.declare_queue(queue)
        if queue not in self._subscribed:
            self._subscribed.append(queue)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("transport is closed")

    def _publish_raw(
        self, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any]
    ) -> None:
        self._check_open()
        self.broker.route(exchange, routing_key, bytes(body), headers, self.user_id)

    def _receive_raw(self, timeout: float) -> RawMessage | None:
        self._check_open()
        taken = self.broker.take(self._subscribed, timeout)
        if taken is None:
            return None
        queue, message = taken
        tag = next(self._tags)
        self._unacked[tag] = taken
        return RawMessage(
            message.body,
            queue,
            tag,
            dict(message.headers),
            message.redelivered,
            message.user_id,
        )

    def _settle_raw(self, handle: Any, ack: bool, requeue: bool) -> None:
        queue, message = self._unacked.pop(handle)
        if not ack and requeue:
            self.broker.give_back(queue, message)
        elif not ack:
            self.broker.dead_letter(queue, message)

    def teardown(self, worker_ids: list[str]) -> None:
        """Delete this topology's queues and exchanges from the in-process broker."""
        t = self.topology
        queues = [t.jobs, t.updates, t.dead, *map(t.task_queue, worker_ids)]
        self.broker.delete(queues, [t.jobs, t.updates, t.dead, t.tasks])

    def purge(self, queue: str) -> int:
        """Drop every ready message of a queue."""
        return self.broker.purge(queue)

    def close(self) -> None:
        """Requeue unsettled messages, as a broker does when a connection closes."""
        for queue, message in self._unacked.values():
            self.broker.give_back(queue, message)
        self._unacked.clear()
        self._closed = True
