"""The RabbitMQ Transport: pika's BlockingConnection with confirms, manual acks and reconnect.

Threads and heartbeats: pika is not thread-safe, so a RabbitMQTransport is used by one thread
at a time - the service thread that runs the main loop. A BlockingConnection answers the broker's
heartbeats only while that thread is inside pika (receive, publish, declare, ...), so a service
must call receive(timeout) regularly, about once a second, even while it is busy: long work such
as training runs in another thread, which hands its result back to the main loop (a
queue.Queue, a Future) for the main loop to publish. A loop that stays out of pika for more than
about two heartbeat intervals (30 s each by default, `?heartbeat=N` in the URL) loses its
connection, and so does a delivery kept unacked past the broker's consumer_timeout (30 min).

Reconnect: an operation that finds the connection or channel gone reconnects with exponential
backoff and full jitter, declares again what was declared before, restores the prefetch and the
subscriptions, and retries; a publish is retried with the same bytes, so a message may arrive
twice and receivers deduplicate by message id. Deliveries of the old connection cannot be settled
any more: the broker requeues them, so their acks are ignored and they are received again.
While it reconnects an operation blocks, for at most the policy's give-up time (300 s by default),
and then raises ConnectionLostError.
"""

from __future__ import annotations

import functools
import logging
import random
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pika
import pika.exceptions
import pika.frame
import pika.spec

from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY, Topology
from broker.transport import RawMessage, Transport
from shared.chunks import DEFAULT_CHUNK_SIZE
from shared.errors import (
    ConfigError,
    ConnectionLostError,
    PublishError,
    TransportError,
    UnroutableError,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PREFETCH = 64
DEFAULT_HEARTBEAT_S = 30
DEFAULT_BLOCKED_CONNECTION_TIMEOUT_S = 60.0
# Bytes asked of the socket per recv() call. pika asks 4 KiB, so a 6.7 MB update takes 1,600
# trips through its I/O loop; 1 MiB reads take the same message 3x faster (bench/ingest.py).
RECV_BYTES = 1 << 20
_PERSISTENT = 2
# The dead queue is the end of the line: quorum and durable, and with no dead-letter exchange.
_DEAD_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}

# The connection (or its channel) is gone: reconnect and retry.
_LOST: tuple[type[Exception], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ChannelWrongStateError,
    OSError,
)
# Retrying cannot help: wrong credentials, vhost or protocol.
_REFUSED: tuple[type[Exception], ...] = (
    pika.exceptions.AuthenticationError,
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
    pika.exceptions.IncompatibleProtocolError,
)


@dataclass(frozen=True)
class ReconnectPolicy:
    """How to retry a lost connection: exponential backoff with full jitter, then give up."""

    base_s: float = 0.5
    cap_s: float = 30.0
    give_up_s: float = 300.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first): uniform in [0, cap]."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(attempt, 62))
        uniform = rng.uniform if rng is not None else random.uniform
        return uniform(0.0, ceiling)


# The reason a message whose AMQP properties cannot be decoded is dead-lettered with.
BAD_PROPERTIES = "bad_properties"


@dataclass(frozen=True)
class _Handle:
    """A delivery tag, valid only on the connection generation that delivered it."""

    generation: int
    delivery_tag: int


@dataclass(frozen=True)
class _Pending:
    queue: str
    delivery_tag: int
    redelivered: bool
    properties: Any
    body: bytes


def masked_url(url: str) -> str:
    """Return the URL with its password replaced by ***, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


# Query parameters of an amqps:// URL that fedq reads itself (pika's own are passed on): the CA
# that signed the broker's certificate, and this client's certificate and key (PEM files).
TLS_QUERY_KEYS = ("cacertfile", "certfile", "keyfile")


def _tls_options(url: str, query: dict[str, list[str]]) -> Any:
    """An SSLOptions verifying the broker against `cacertfile` (else the system CAs) and
    presenting `certfile`/`keyfile` when given."""
    import ssl

    files = {key: query[key][-1] for key in TLS_QUERY_KEYS if key in query}
    try:
        context = ssl.create_default_context(cafile=files.get("cacertfile"))
        if "certfile" in files:
            context.load_cert_chain(files["certfile"], files.get("keyfile"))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS files of {masked_url(url)}: {e}") from e
    if "keyfile" in files and "certfile" not in files:
        raise ConfigError(f"{masked_url(url)}: keyfile without certfile")
    return pika.SSLOptions(context, server_hostname=urlsplit(url).hostname)


def _connection_parameters(url: str, connection_name: str) -> Any:
    """Parse an amqp(s) URL; heartbeats and blocked-connection timeout default on, not off.

    amqps:// URLs may carry ?cacertfile=...&certfile=...&keyfile=... for TLS with a private CA
    and client certificates (the broker's ssl_options verify_peer, fail_if_no_peer_cert).
    """
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    pika_url = url
    if any(key in query for key in TLS_QUERY_KEYS):
        if parts.scheme != "amqps":
            raise ConfigError(f"{masked_url(url)}: TLS files need an amqps:// URL")
        kept = [
            pair
            for pair in parts.query.split("&")
            if pair and pair.split("=", 1)[0] not in TLS_QUERY_KEYS
        ]
        pika_url = urlunsplit(parts._replace(query="&".join(kept)))
    try:
        params = pika.URLParameters(pika_url)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid broker URL {masked_url(url)}: {e}") from e
    if any(key in query for key in TLS_QUERY_KEYS):
        params.ssl_options = _tls_options(url, query)
    if "heartbeat" not in query:
        params.heartbeat = DEFAULT_HEARTBEAT_S
    if "blocked_connection_timeout" not in query:
        params.blocked_connection_timeout = DEFAULT_BLOCKED_CONNECTION_TIMEOUT_S
    params.client_properties = dict(params.client_properties or {}) | {
        "connection_name": connection_name
    }
    return params


class RabbitMQTransport(Transport):
    """A Transport over RabbitMQ with publisher confirms, manual acks and reconnect; one thread."""

    def __init__(
        self,
        url: str,
        topology: Topology,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        prefetch_count: int = DEFAULT_PREFETCH,
        reconnect: ReconnectPolicy | None = None,
        connection_name: str | None = None,
        stamp_user_id: bool = False,
        declare_topology: bool = True,
    ) -> None:
        super().__init__(topology, chunk_size)
        if prefetch_count < 1:
            raise ConfigError("prefetch_count must be at least 1 (0 would mean unbounded)")
        self.prefetch_count = prefetch_count
        self.reconnect_policy = reconnect or ReconnectPolicy()
        self.connection_name = connection_name or f"fedq {topology.prefix}"
        self.reconnects = 0  # successful reconnects so far, for a metric
        self._url = masked_url(url)
        self._params = _connection_parameters(url, self.connection_name)
        # user_id on every message: the broker refuses one that is not the connection's user, so
        # a receiver can trust it (the aggregator checks it against an update's worker id).
        username = getattr(self._params.credentials, "username", None)
        self.user_id = str(username) if stamp_user_id and username else None
        # False: a least-privilege worker checks its queue passively instead of declaring it.
        self.declare_topology = declare_topology
        self._connection: Any = None
        self._channel: Any = None
        self._generation = 0
        self._declared = False
        self._workers: list[str] = []
        self._subscribed: list[str] = []
        self._pending: deque[_Pending] = deque()
        self._unsettled: set[int] = set()
        self._closed = False
        self._connect(time.monotonic() + self.reconnect_policy.give_up_s)

    # -------------------------------------------------------------- topology

    def declare(self) -> None:
        """Declare the jobs, updates, dead and tasks exchanges and their queues (idempotent)."""
        self._run("declare", self._declare_shared)
        self._declared = True

    def declare_worker(self, worker_id: str) -> None:
        """Declare a worker's task queue bound to the tasks exchange by its id (idempotent)."""
        self.topology.task_queue(worker_id)  # validates the id before anything reaches the broker
        self._run(f"declare worker {worker_id}", functools.partial(self._declare_worker, worker_id))
        if worker_id not in self._workers:
            self._workers.append(worker_id)

    def exchange_exists(self, exchange: str) -> bool:
        """Whether the exchange is declared: a passive declare on a channel of its own (the
        broker closes a channel that asks for a missing exchange; the service's stays open)."""

        def check() -> bool:
            channel = self._connection.channel()
            # The 404 is the answer (pika's own warning about it is filtered with the others).
            try:
                channel.exchange_declare(exchange, passive=True)
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code == 404:
                    return False
                raise
            if channel.is_open:
                channel.close()
            return True

        return self._run(f"check exchange {exchange}", check)

    def subscribe(self, queue: str) -> None:
        """Consume from a declared queue; receive() then returns its messages."""
        if queue in self._subscribed:
            return
        self._run(f"subscribe to {queue}", functools.partial(self._consume, queue))
        self._subscribed.append(queue)

    def purge(self, queue: str) -> int:
        """Drop every ready message of a queue; return how many."""
        frame = self._run(f"purge {queue}", lambda: self._channel.queue_purge(queue))
        return int(frame.method.message_count)

    def teardown(self, worker_ids: list[str]) -> None:
        """Delete the queues and exchanges of this topology and of these workers."""
        t = self.topology
        queues = [t.jobs, t.updates, t.dead, *map(t.task_queue, worker_ids)]

        def delete() -> None:
            for queue in queues:
                self._channel.queue_delete(queue)
            for exchange in (t.jobs, t.updates, t.dead, t.tasks):
                self._channel.exchange_delete(exchange)

        self._run("delete the topology", delete)

    def close(self) -> None:
        """Close the connection; the broker requeues unsettled deliveries. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._unsettled.clear()
        self._drop_connection()
        logger.info("closed connection %r to %s", self.connection_name, self._url)

    # -------------------------------------------------------------- raw operations

    def _publish_raw(
        self, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any]
    ) -> None:
        properties = pika.BasicProperties(
            delivery_mode=_PERSISTENT, headers=headers, user_id=self.user_id
        )

        def publish() -> None:
            self._channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)

        self._run(f"publish to {exchange!r}/{routing_key!r}", publish, publishing=True)

    def _receive_raw(self, timeout: float) -> RawMessage | None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            while not self._pending:
                remaining = max(0.0, deadline - time.monotonic())
                # process_data_events returns as soon as a delivery is dispatched, and answers
                # heartbeats while it waits; time_limit=0 polls once.
                self._run("receive", functools.partial(self._poll, remaining))
                if remaining <= 0.0:
                    break
            if not self._pending:
                return None
            pending = self._pending.popleft()
            self._unsettled.add(pending.delivery_tag)
            properties = pending.properties
            raw = RawMessage(
                body=bytes(pending.body),
                queue=pending.queue,
                handle=_Handle(self._generation, pending.delivery_tag),
                headers=dict(properties.headers or {}),
                redelivered=bool(pending.redelivered),
                user_id=properties.user_id,
            )
            if not isinstance(properties, UndecodableProperties):
                return raw
            self._reject_undecodable(raw, properties.decode_error)

    def _reject_undecodable(self, raw: RawMessage, error: str) -> None:
        """Dead-letter (and ack) a message whose properties could not be decoded, without them:
        handing it on would tell its receiver nothing true, requeueing it would come back."""
        sender = raw.user_id if isinstance(raw.user_id, str) else "not set"
        detail = f"AMQP properties cannot be decoded ({error}); user_id {sender}"
        logger.warning("dead-lettering a message from %s: %s", raw.queue, detail)
        self._refuse([raw], BAD_PROPERTIES, detail)

    def _settle_raw(self, handle: Any, ack: bool, requeue: bool) -> None:
        if not isinstance(handle, _Handle):
            raise TransportError(f"{handle!r} is not a delivery of a RabbitMQTransport")
        if handle.generation != self._generation or not self._is_open():
            # The connection that delivered it is gone and the broker has requeued it.
            logger.debug("ignoring settle of delivery %d of a lost connection", handle.delivery_tag)
            return
        if handle.delivery_tag not in self._unsettled:
            # Settling twice would make the broker close the channel, requeueing everything.
            raise TransportError(f"delivery {handle.delivery_tag} is already settled")
        self._unsettled.discard(handle.delivery_tag)
        try:
            if ack:
                self._channel.basic_ack(handle.delivery_tag)
            else:
                self._channel.basic_nack(handle.delivery_tag, requeue=requeue)
        except _LOST as e:
            logger.warning("connection to %s lost while settling: %r", self._url, e)
            self._drop_connection()
        except pika.exceptions.AMQPError as e:
            self._drop_connection()
            raise TransportError(f"settling delivery {handle.delivery_tag} failed: {e!r}") from e

    # -------------------------------------------------------------- channel work

    def _declare_shared(self) -> None:
        t, channel = self.topology, self._channel
        for name, kind, arguments, key in (
            (t.jobs, "direct", t.jobs_queue_arguments(), JOB_ROUTING_KEY),
            (t.updates, "direct", t.updates_queue_arguments(), UPDATE_ROUTING_KEY),
            (t.dead, "fanout", _DEAD_QUEUE_ARGUMENTS, ""),
        ):
            channel.exchange_declare(name, exchange_type=kind, durable=True)
            channel.queue_declare(name, durable=True, arguments=arguments)
            channel.queue_bind(name, name, routing_key=key)
        channel.exchange_declare(t.tasks, exchange_type="direct", durable=True)

    def _declare_worker(self, worker_id: str) -> None:
        t, channel = self.topology, self._channel
        queue = t.task_queue(worker_id)
        if not self.declare_topology:
            # Declared by an operator (`fedq broker add-worker`): only check that it is there.
            channel.queue_declare(queue, passive=True)
            return
        channel.exchange_declare(t.tasks, exchange_type="direct", durable=True)
        channel.queue_declare(queue, durable=True, arguments=t.queue_arguments())
        channel.queue_bind(queue, t.tasks, routing_key=worker_id)

    def _poll(self, time_limit: float) -> None:
        self._connection.process_data_events(time_limit=time_limit)

    def _consume(self, queue: str) -> None:
        callback = functools.partial(self._on_message, self._generation, queue)
        self._channel.basic_consume(queue, callback, auto_ack=False)

    def _on_message(
        self, generation: int, queue: str, _channel: Any, method: Any, properties: Any, body: bytes
    ) -> None:
        # Runs inside process_data_events: only buffer, never call back into pika here.
        if generation == self._generation:
            self._pending.append(
                _Pending(queue, method.delivery_tag, method.redelivered, properties, body)
            )

    # -------------------------------------------------------------- connection

    def _is_open(self) -> bool:
        return bool(
            self._connection is not None
            and self._connection.is_open
            and self._channel is not None
            and self._channel.is_open
        )

    def _run(self, what: str, op: Callable[[], T], publishing: bool = False) -> T:
        """Run a channel operation; after a connection loss, reconnect and run it again."""
        if self._closed:
            raise TransportError(f"cannot {what}: the transport is closed")
        deadline = time.monotonic() + self.reconnect_policy.give_up_s
        failures = 0
        while True:
            if not self._is_open():
                if self._connection is not None:
                    logger.warning("connection to %s is closed; reconnecting", self._url)
                self._drop_connection()
                self._connect(deadline, max(0, failures - 1))
                self.reconnects += 1
            try:
                return op()
            except _LOST as e:
                logger.warning("connection to %s lost during %s: %r", self._url, what, e)
                self._drop_connection()
                failures += 1
            except pika.exceptions.AMQPError as e:
                if isinstance(e, pika.exceptions.ChannelClosed):
                    # The broker closed the channel; the next operation opens a fresh one.
                    self._drop_connection()
                raise _refusal(what, e, publishing) from e

    def _connect(self, deadline: float, attempt: int = 0) -> None:
        """Open connection and channel and restore earlier declarations, with backoff.

        Each failed attempt is one warning line (where, attempt n, why, next try in s), without
        a traceback: the failure is expected and retried, and pika's own account of it is
        left out (see _PikaFailures) unless pika's loggers are asked for DEBUG.
        """
        if attempt > 0:
            delay = self.reconnect_policy.delay(attempt - 1)
            if time.monotonic() + delay > deadline:
                raise ConnectionLostError(
                    f"no connection to {self._url} within {self.reconnect_policy.give_up_s:g} s"
                )
            time.sleep(delay)
        while True:
            try:
                self._open()
                return
            except _REFUSED as e:
                self._drop_connection()
                raise TransportError(f"{self._url} refused the connection: {e!r}") from e
            except pika.exceptions.ChannelClosedByBroker as e:
                self._drop_connection()
                raise TransportError(f"restoring the topology on {self._url} failed: {e!r}") from e
            except (pika.exceptions.AMQPError, OSError) as e:
                self._drop_connection()
                delay = self.reconnect_policy.delay(attempt)
                attempt += 1
                if time.monotonic() + delay > deadline:
                    logger.error(
                        "cannot connect to RabbitMQ at %s (attempt %d): %s; giving up",
                        self._url,
                        attempt,
                        connect_failure(e),
                    )
                    raise ConnectionLostError(
                        f"no connection to {self._url} within "
                        f"{self.reconnect_policy.give_up_s:g} s ({attempt} attempts): "
                        f"{connect_failure(e)}"
                    ) from e
                logger.warning(
                    "cannot connect to RabbitMQ at %s (attempt %d): %s; next attempt in %.1f s",
                    self._url,
                    attempt,
                    connect_failure(e),
                    delay,
                )
                time.sleep(delay)

    def _open(self) -> None:
        self._generation += 1
        self._pending.clear()
        self._unsettled.clear()
        # Chunk sets in progress are kept: their envelopes were acked as they arrived, so only
        # the ones not yet received (or whose ack was lost) come again on the new connection.
        quiet_pika_failures()  # here: a pika module imported since the last time has a logger
        self._connection = pika.BlockingConnection(self._params)
        read_in_large_pieces(self._connection)
        decode_properties_tolerantly(self._connection)
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        self._channel.basic_qos(prefetch_count=self.prefetch_count)
        if self._declared:
            self._declare_shared()
        for worker_id in self._workers:
            self._declare_worker(worker_id)
        for queue in self._subscribed:
            self._consume(queue)
        logger.info(
            "connected %r to %s (connection %d; re-declared: shared=%s, workers=%d, consumers=%d)",
            self.connection_name,
            self._url,
            self._generation,
            self._declared,
            len(self._workers),
            len(self._subscribed),
        )

    def _drop_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is None or not connection.is_open:
            return
        try:
            connection.close()
        except (pika.exceptions.AMQPError, OSError) as e:
            logger.debug("closing the connection to %s failed: %r", self._url, e)


def connect_failure(error: BaseException) -> str:
    """Why a connection attempt failed, in a few words: pika nests the cause (in args, in
    `exception` of a phase error, last of `exceptions` of a failed workflow)."""
    cause = error
    for _ in range(8):
        nested = [
            *(a for a in cause.args if isinstance(a, BaseException)),
            getattr(cause, "exception", None),
            *reversed(getattr(cause, "exceptions", ())),
        ]
        inner = next((e for e in nested if isinstance(e, BaseException)), None)
        if inner is None:
            break
        cause = inner
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    text = str(cause).strip("(),' ")
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


# pika logs its failures on its module loggers - a failed connection attempt as several ERROR
# lines and a traceback (logger.exception in BlockingConnection._create_connection), a lost
# connection as ERROR lines with the caller's stack - and then raises them to this module, which
# retries and reports each in one line of fedq's own. So pika's own warnings and errors are
# duplicates, left out unless pika's loggers are asked for DEBUG (--library-log-level DEBUG),
# where they belong to pika's step-by-step account; its INFO lines follow the libraries' level.
class _PikaFailures(logging.Filter):
    """Drops pika's WARNING-and-above records unless pika's loggers are at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_PIKA_FILTER = _PikaFailures()


def quiet_pika_failures() -> None:
    """Put the filter on every pika logger (idempotent; a filter covers only its own logger's
    records, and pika has one logger per module, so each gets it)."""
    loggers = list(logging.Logger.manager.loggerDict.items())
    pika_loggers = [
        found
        for name, found in loggers
        if name.split(".")[0] == "pika" and isinstance(found, logging.Logger)
    ]
    for pika_logger in pika_loggers:
        if _PIKA_FILTER not in pika_logger.filters:
            pika_logger.addFilter(_PIKA_FILTER)


def read_in_large_pieces(connection: Any, size: int = RECV_BYTES) -> bool:
    """Make a pika BlockingConnection read up to `size` bytes per recv() instead of 4 KiB.

    pika has no setting for it: its socket transport reads `_MAX_RECV_BYTES` at a time, a class
    attribute that this overrides on the connection's own transport object. Returns whether it
    could (a pika without that attribute is left as it is, only slower).
    """
    transport = getattr(getattr(connection, "_impl", None), "_transport", None)
    if transport is None or not hasattr(transport, "_MAX_RECV_BYTES"):
        logger.debug("cannot enlarge pika's reads: no _MAX_RECV_BYTES on its transport")
        return False
    transport._MAX_RECV_BYTES = size
    return True


# What pika's decoding of a content header's properties raises on values RabbitMQ passes on:
# a 'T' timestamp past year 9999 (OverflowError, ValueError; OSError on some platforms), field
# tables or arrays nested deeper than Python's stack (RecursionError), and, for bytes that do not
# add up, struct.error, IndexError, or pika's own InvalidFieldTypeException.
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    ArithmeticError,
    ValueError,
    OSError,
    LookupError,
    RecursionError,
    struct.error,
    pika.exceptions.AMQPError,
)


class UndecodableProperties(pika.spec.BasicProperties):  # type: ignore[misc]
    """The properties of a message pika could not decode: `decode_error` says why.

    Its headers are None; the other fields are the frame's where they could be read without the
    headers table (user_id among them), else None.
    """

    def __init__(self, decode_error: str) -> None:
        super().__init__()
        self.decode_error = decode_error


def decode_frame_tolerantly(data: bytes) -> tuple[int, Any]:
    """pika.frame.decode_frame, except that a whole content-header frame whose properties pika
    cannot decode comes out as a Header frame with UndecodableProperties instead of raising.

    pika raises such errors out of its I/O loop, which drops the connection; the broker then
    redelivers the message, to the same end, for as long as it sits in the queue. The frame's
    length is known before its properties are decoded, so the stream stays in step. Any other
    frame, and a header frame that is incomplete or broken as a frame, is left to pika.
    """
    try:
        decoded: tuple[int, Any] = pika.frame.decode_frame(data)
        return decoded
    except _DECODE_ERRORS as e:
        substitute = _undecodable_header(data, f"{type(e).__name__}: {e}")
        if substitute is None:
            raise
        return substitute


def _undecodable_header(data: bytes, error: str) -> tuple[int, Any] | None:
    """The Header frame at the start of `data`, its properties decoded without the headers
    table; None unless `data` starts with a whole, well-delimited basic content-header frame."""
    if len(data) < pika.spec.FRAME_HEADER_SIZE + 12:
        return None
    frame_type, channel, size = struct.unpack_from(">BHL", data)
    end = pika.spec.FRAME_HEADER_SIZE + size + pika.spec.FRAME_END_SIZE
    if frame_type != pika.spec.FRAME_HEADER or size < 12 or end > len(data):
        return None
    if data[end - 1] != pika.spec.FRAME_END:
        return None
    class_id, _weight, body_size = struct.unpack_from(">HHQ", data, pika.spec.FRAME_HEADER_SIZE)
    if class_id != pika.spec.BasicProperties.INDEX:
        return None
    properties = UndecodableProperties(error)
    try:
        properties.decode(_without_headers(data[pika.spec.FRAME_HEADER_SIZE + 12 : end - 1]))
    except _DECODE_ERRORS:
        properties = UndecodableProperties(error)  # the fields cannot be told apart: none set
    return end, pika.frame.Header(channel, body_size, properties)


def _without_headers(encoded: bytes) -> bytes:
    """Encoded basic properties with the headers table cut out (and its flag cleared); raises
    ValueError if the table's length runs past the end, so the rest would be misread."""
    flags = struct.unpack_from(">H", encoded)[0]
    if flags & 1:
        raise ValueError("a second property flag word (not in AMQP 0-9-1)")
    if not flags & pika.spec.BasicProperties.FLAG_HEADERS:
        return encoded
    offset = 2
    for flag in (
        pika.spec.BasicProperties.FLAG_CONTENT_TYPE,
        pika.spec.BasicProperties.FLAG_CONTENT_ENCODING,
    ):
        if flags & flag:
            offset += 1 + encoded[offset]  # a short string: length octet, then the bytes
    table_end = offset + 4 + struct.unpack_from(">I", encoded, offset)[0]
    if table_end > len(encoded):
        raise ValueError("the headers table runs past the end of the frame")
    cleared = flags & ~pika.spec.BasicProperties.FLAG_HEADERS
    return struct.pack(">H", cleared) + encoded[2:offset] + encoded[table_end:]


def decode_properties_tolerantly(connection: Any) -> bool:
    """Make a pika BlockingConnection read frames with decode_frame_tolerantly, so that a
    message with properties pika cannot decode reaches the consumer marked as such instead of
    dropping the connection (see _receive_raw, which dead-letters it).

    pika has no setting for it: its connection reads each frame with `_read_frame()`, a method
    that this replaces on the connection's own object. Returns whether it could.
    """
    impl = getattr(connection, "_impl", None)
    if impl is None or not hasattr(impl, "_read_frame") or not hasattr(impl, "_frame_buffer"):
        logger.warning(
            "cannot guard pika's frame decoding: a message with undecodable properties will "
            "drop the connection"
        )
        return False

    def read_frame() -> tuple[int, Any]:
        return decode_frame_tolerantly(impl._frame_buffer)

    impl._read_frame = read_frame
    return True


def _refusal(what: str, error: Exception, publishing: bool) -> TransportError:
    """Translate a pika error that reconnecting cannot fix into fedq's error tree."""
    kind = PublishError if publishing else TransportError
    if isinstance(error, pika.exceptions.UnroutableError):
        return UnroutableError(f"{what}: unroutable, no queue is bound for it")
    if isinstance(error, pika.exceptions.NackError):
        return PublishError(f"{what}: the broker nacked the message")
    if isinstance(error, pika.exceptions.ChannelClosedByBroker):
        return kind(f"{what}: the broker refused it: {error.reply_code} {error.reply_text}")
    return kind(f"{what} failed: {error!r}")


def queues_ready(url: str, queues: list[str], timeout_s: float) -> dict[str, int]:
    """Messages ready in each queue, by a passive declare on a short-lived connection (what
    `fedq status --broker` shows); TransportError if the broker or a queue is not there."""
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = timeout_s
    params.blocked_connection_timeout = timeout_s
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as e:
        raise TransportError(
            f"cannot reach the broker at {params.host}:{params.port}: {e!r}"
        ) from e
    out: dict[str, int] = {}
    try:
        for queue in queues:
            channel = connection.channel()
            try:
                frame = channel.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as e:
                raise TransportError(f"queue {queue!r}: {e.reply_text}") from e
            out[queue] = int(frame.method.message_count)
            if channel.is_open:
                channel.close()
    finally:
        if connection.is_open:
            connection.close()
    return out
