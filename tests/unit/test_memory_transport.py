"""Tests of the in-process transport: routing, settling, dead-lettering, chunking and closing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from broker.memory import MemoryBroker, MemoryTransport
from broker.spool import ChunkSpool
from broker.topology import (
    DETAIL_HEADER,
    REASON_HEADER,
    SOURCE_HEADER,
    UPDATE_ROUTING_KEY,
    USER_ID_HEADER,
    DeadLetter,
    Topology,
    read_dead_letter,
)
from broker.transport import Delivery, dead_letter_headers
from shared.chunks import Reassembler, split_payload
from shared.errors import PublishError, TransportError

TOPOLOGY = Topology("test")
TIMEOUT = 0.05


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
def transport(broker: MemoryBroker) -> Iterator[MemoryTransport]:
    transport = MemoryTransport(broker, TOPOLOGY, chunk_size=1024)
    transport.declare()
    transport.subscribe(TOPOLOGY.updates)
    yield transport
    transport.close()


def dead_letters(broker: MemoryBroker) -> list[tuple[bytes, dict[str, Any]]]:
    """(body, headers) of every message on the dead queue, taken straight from the broker.

    Not through a Transport: one would try to reassemble dead-lettered chunks.
    """
    found = []
    while (taken := broker.take([TOPOLOGY.dead], 0)) is not None:
        found.append((taken[1].body, taken[1].headers))
    return found


def publish_update(transport: MemoryTransport, body: bytes) -> None:
    transport.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, body)


def receive(transport: MemoryTransport) -> Delivery:
    delivery = transport.receive(TIMEOUT)
    assert delivery is not None
    return delivery


def test_a_published_message_is_received_and_gone_once_acked(
    transport: MemoryTransport, broker: MemoryBroker
) -> None:
    publish_update(transport, b"hello")

    delivery = receive(transport)
    transport.ack(delivery)

    assert (delivery.body, delivery.queue, delivery.redelivered) == (
        b"hello",
        TOPOLOGY.updates,
        False,
    )
    assert transport.receive(0) is None
    assert broker.depth(TOPOLOGY.updates) == 0


def test_messages_are_received_in_publish_order(transport: MemoryTransport) -> None:
    for body in (b"first", b"second", b"third"):
        publish_update(transport, body)

    bodies = [receive(transport).body for _ in range(3)]

    assert bodies == [b"first", b"second", b"third"]


def test_receive_returns_none_when_nothing_arrives_in_time(transport: MemoryTransport) -> None:
    assert transport.receive(TIMEOUT) is None


def test_a_nack_with_requeue_gives_the_message_back_marked_redelivered(
    transport: MemoryTransport,
) -> None:
    publish_update(transport, b"retry me")
    transport.nack(receive(transport), requeue=True)

    again = receive(transport)

    assert again.body == b"retry me"
    assert again.redelivered


def test_a_nack_without_requeue_is_dead_lettered_by_the_broker_with_x_death(
    transport: MemoryTransport, broker: MemoryBroker
) -> None:
    publish_update(transport, b"drop me")

    transport.nack(receive(transport), requeue=False)

    [(body, headers)] = dead_letters(broker)
    assert body == b"drop me"
    [death] = headers["x-death"]
    assert (death["queue"], death["reason"], death["count"]) == (TOPOLOGY.updates, "rejected", 1)
    assert (death["exchange"], death["routing-keys"]) == (TOPOLOGY.updates, [UPDATE_ROUTING_KEY])
    assert headers["x-first-death-queue"] == TOPOLOGY.updates
    assert read_dead_letter(headers) == DeadLetter("rejected", TOPOLOGY.updates, "broker")
    assert transport.receive(0) is None


def test_a_message_dead_lettered_again_from_the_same_queue_counts_up_its_x_death_entry(
    transport: MemoryTransport, broker: MemoryBroker
) -> None:
    publish_update(transport, b"twice")
    transport.nack(receive(transport), requeue=False)
    [(body, headers)] = dead_letters(broker)
    transport.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, body, headers)  # an operator's replay

    transport.nack(receive(transport), requeue=False)

    [(_, again)] = dead_letters(broker)
    [death] = again["x-death"]
    assert (death["queue"], death["count"]) == (TOPOLOGY.updates, 2)


def test_a_message_rejected_from_the_dead_queue_is_dropped_as_on_rabbitmq(
    broker: MemoryBroker,
) -> None:
    reader = MemoryTransport(broker, TOPOLOGY)
    reader.declare()
    reader.subscribe(TOPOLOGY.dead)
    broker.route(TOPOLOGY.dead, "", b"dead", {})

    reader.nack(receive(reader), requeue=False)

    assert broker.depth(TOPOLOGY.dead) == 0


def test_a_transport_that_dead_letters_by_broker_rejects_with_x_death_and_no_reason_header(
    transport: MemoryTransport, broker: MemoryBroker
) -> None:
    reasons: list[str] = []
    transport.on_reject = reasons.append
    transport.dead_letters_by_broker = True
    publish_update(transport, b"refused")

    transport.reject(receive(transport), "malformed", "not msgpack")

    [(body, headers)] = dead_letters(broker)
    assert body == b"refused"
    assert headers["x-death"][0]["queue"] == TOPOLOGY.updates
    assert not any(key.startswith("x-fedq-") for key in headers)
    assert reasons == ["malformed"]


def test_a_transport_that_dead_letters_by_broker_never_publishes_to_the_dead_exchange(
    transport: MemoryTransport, broker: MemoryBroker
) -> None:
    transport.dead_letters_by_broker = True
    bad = msgpack.unpackb(split_payload(bytes(3000), 1024)[0])
    bad["index"] = 99  # an invalid envelope: still unsettled, so the broker dead-letters it
    broker.route(TOPOLOGY.updates, UPDATE_ROUTING_KEY, msgpack.packb(bad, use_bin_type=True), {})
    tampered = split_payload(bytes(10_000), 1024)  # a bad set, whose envelopes are acked
    envelope = msgpack.unpackb(tampered[3])
    envelope["data"] = b"\x01" + envelope["data"][1:]
    tampered[3] = msgpack.packb(envelope, use_bin_type=True)
    for part in tampered:
        broker.route(TOPOLOGY.updates, UPDATE_ROUTING_KEY, part, {})
    published: list[str] = []
    publish_raw = transport._publish_raw

    def record(exchange: str, *args: Any) -> None:
        published.append(exchange)
        publish_raw(exchange, *args)

    transport._publish_raw = record  # type: ignore[method-assign]

    assert transport.receive(TIMEOUT) is None

    assert published == []
    [(_, headers)] = dead_letters(broker)  # only the invalid envelope, by the broker
    assert headers["x-death"][0]["queue"] == TOPOLOGY.updates
    assert broker.depth(TOPOLOGY.updates) == 0


def test_a_transport_that_dead_letters_by_broker_drops_a_rejected_chunked_message_with_a_warning(
    transport: MemoryTransport, broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    reasons: list[str] = []
    transport.on_reject = reasons.append
    transport.dead_letters_by_broker = True
    publish_update(transport, bytes(3000))  # its envelopes are acked as they are held

    transport.reject(receive(transport), "malformed", "not msgpack")

    assert dead_letters(broker) == []
    assert broker.depth(TOPOLOGY.updates) == 0
    assert reasons == ["malformed"]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "cannot write the dead exchange" in warning


def test_a_transport_that_dead_letters_by_broker_drops_a_nacked_chunked_message_uncounted(
    transport: MemoryTransport, broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    reasons: list[str] = []
    transport.on_reject = reasons.append
    transport.dead_letters_by_broker = True
    publish_update(transport, bytes(3000))

    transport.nack(receive(transport), requeue=False)

    assert dead_letters(broker) == []
    assert transport.receive(TIMEOUT) is None
    assert reasons == []
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "cannot write the dead exchange" in warning


def test_a_rejected_message_is_dead_lettered_with_its_reason_and_source(
    transport: MemoryTransport, broker: MemoryBroker
) -> None:
    reasons: list[str] = []
    transport.on_reject = reasons.append
    transport.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, b"bad", {"origin": "w1"})

    transport.reject(receive(transport), "too_stale")

    ((body, headers),) = dead_letters(broker)
    assert body == b"bad"
    assert headers[REASON_HEADER] == "too_stale"
    assert headers[SOURCE_HEADER] == TOPOLOGY.updates
    assert headers["origin"] == "w1"
    assert reasons == ["too_stale"]
    assert broker.depth(TOPOLOGY.updates) == 0


def test_a_senders_forged_dead_letter_headers_are_replaced_by_the_rejecting_services(
    transport: MemoryTransport, broker: MemoryBroker
) -> None:
    forged = {
        REASON_HEADER: "bad_tensor",
        SOURCE_HEADER: TOPOLOGY.task_queue("site-b"),
        DETAIL_HEADER: "site-b sent NaNs",
        USER_ID_HEADER: "site-b",
        "x-death": [{"queue": TOPOLOGY.task_queue("site-b"), "reason": "rejected", "count": 1}],
        "x-first-death-reason": "rejected",
    }
    MemoryTransport(broker, TOPOLOGY, user="site-a").publish(
        TOPOLOGY.updates, UPDATE_ROUTING_KEY, b"forged", forged
    )

    transport.reject(receive(transport), "unknown_job")

    ((_, headers),) = dead_letters(broker)
    assert headers == {
        REASON_HEADER: "unknown_job",
        SOURCE_HEADER: TOPOLOGY.updates,
        USER_ID_HEADER: "site-a",
    }
    assert read_dead_letter(headers) == DeadLetter("unknown_job", TOPOLOGY.updates, "service")


def test_publishing_to_a_worker_without_a_queue_raises_publish_error(
    transport: MemoryTransport,
) -> None:
    with pytest.raises(PublishError):
        transport.publish(TOPOLOGY.tasks, "nobody", b"task")


def test_publishing_to_an_undeclared_exchange_raises_publish_error(
    transport: MemoryTransport,
) -> None:
    with pytest.raises(PublishError):
        transport.publish("test.nowhere", UPDATE_ROUTING_KEY, b"lost")


def test_a_task_reaches_only_the_queue_of_its_worker(broker: MemoryBroker) -> None:
    aggregator = MemoryTransport(broker, TOPOLOGY)
    aggregator.declare()
    workers = {name: MemoryTransport(broker, TOPOLOGY) for name in ("w1", "w2")}
    for name, worker in workers.items():
        worker.declare_worker(name)
        worker.subscribe(TOPOLOGY.task_queue(name))

    aggregator.publish(TOPOLOGY.tasks, "w2", b"for w2")

    assert workers["w1"].receive(0) is None
    assert receive(workers["w2"]).body == b"for w2"


def test_a_payload_larger_than_the_chunk_size_travels_in_chunks_and_arrives_whole(
    transport: MemoryTransport, broker: MemoryBroker
) -> None:
    payload = bytes(i % 253 for i in range(10_000))
    publish_update(transport, payload)
    queued = broker.depth(TOPOLOGY.updates)

    delivery = receive(transport)
    transport.ack(delivery)

    assert queued == 10
    assert delivery.body == payload
    assert broker.depth(TOPOLOGY.updates) == 0
    assert transport.receive(0) is None


def test_chunk_envelopes_are_acked_as_they_are_held_before_their_message_is_settled(
    broker: MemoryBroker,
) -> None:
    first = MemoryTransport(broker, TOPOLOGY, chunk_size=1024)
    first.declare()
    first.subscribe(TOPOLOGY.updates)
    publish_update(first, bytes(10_000))

    delivery = receive(first)
    first.close()  # never settled: only unacked deliveries would go back to the queue

    assert len(delivery.body) == 10_000
    assert broker.depth(TOPOLOGY.updates) == 0


def test_a_tampered_chunk_set_is_dead_lettered_as_bad_chunk(
    transport: MemoryTransport, broker: MemoryBroker
) -> None:
    reasons: list[str] = []
    transport.on_reject = reasons.append
    parts = split_payload(bytes(10_000), 1024)
    envelope = msgpack.unpackb(parts[3])
    envelope["data"] = b"\x01" + envelope["data"][1:]
    parts[3] = msgpack.packb(envelope, use_bin_type=True)
    for part in parts:
        broker.route(TOPOLOGY.updates, UPDATE_ROUTING_KEY, part, {})

    delivery = transport.receive(TIMEOUT)

    assert delivery is None
    dead = dead_letters(broker)
    assert sorted(body for body, _ in dead) == sorted(parts)
    assert {headers[REASON_HEADER] for _, headers in dead} == {"bad_chunk"}
    assert reasons == ["bad_chunk"]
    assert broker.depth(TOPOLOGY.updates) == 0


@pytest.mark.parametrize("spooled", [False, True])
def test_a_chunk_set_is_its_senders_alone_whoever_sends_an_envelope_with_its_message_id(
    transport: MemoryTransport, broker: MemoryBroker, tmp_path: Path, spooled: bool
) -> None:
    if spooled:
        transport.hold_chunks(Reassembler(), ChunkSpool(tmp_path))
    payload = bytes(i % 251 for i in range(3000))
    parts = split_payload(payload, 1024)
    broker.route(TOPOLOGY.updates, UPDATE_ROUTING_KEY, parts[0], {}, "mallory")
    for part in parts:
        broker.route(TOPOLOGY.updates, UPDATE_ROUTING_KEY, part, {}, "alice")

    delivery = receive(transport)
    transport.ack(delivery)

    assert (delivery.body, delivery.user_id) == (payload, "alice")
    assert transport.chunk_backlog() == (1, 1024)  # mallory's own set, incomplete
    if spooled:
        assert len(ChunkSpool(tmp_path).load()) == 1


def test_an_invalid_chunk_is_dead_lettered_alone(
    transport: MemoryTransport, broker: MemoryBroker
) -> None:
    envelope = msgpack.unpackb(split_payload(bytes(3000), 1024)[0])
    envelope["index"] = 99
    broker.route(
        TOPOLOGY.updates, UPDATE_ROUTING_KEY, msgpack.packb(envelope, use_bin_type=True), {}
    )
    publish_update(transport, b"next")

    delivery = receive(transport)

    assert delivery.body == b"next"
    ((_, headers),) = dead_letters(broker)
    assert headers[REASON_HEADER] == "bad_chunk"


def test_close_gives_unacked_messages_back_to_their_queue(broker: MemoryBroker) -> None:
    first = MemoryTransport(broker, TOPOLOGY)
    first.declare()
    first.subscribe(TOPOLOGY.updates)
    publish_update(first, b"one")
    publish_update(first, b"two")
    receive(first)
    receive(first)

    first.close()
    second = MemoryTransport(broker, TOPOLOGY)
    second.subscribe(TOPOLOGY.updates)
    redelivered = [receive(second) for _ in range(2)]

    assert broker.depth(TOPOLOGY.updates) == 0
    assert sorted(d.body for d in redelivered) == [b"one", b"two"]
    assert all(d.redelivered for d in redelivered)


def test_a_closed_transport_refuses_to_publish(transport: MemoryTransport) -> None:
    transport.close()

    with pytest.raises(TransportError):
        publish_update(transport, b"late")


def test_teardown_deletes_the_topology_so_publishing_to_it_fails() -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker, Topology("gone"))
    transport.declare()
    transport.declare_worker("w0")
    transport.publish(transport.topology.updates, "update", b"x")

    transport.teardown(["w0"])

    assert broker.depth(transport.topology.updates) == 0
    with pytest.raises(PublishError):
        transport.publish(transport.topology.updates, "update", b"x")


def test_a_broker_made_dead_letter_is_read_from_its_x_death_not_its_publishers_headers() -> None:
    headers = {
        REASON_HEADER: "bad_tensor",  # the publisher's own, carried along by the broker
        SOURCE_HEADER: TOPOLOGY.updates,
        "x-death": [
            {"queue": b"test.tasks.w0", "reason": b"rejected", "count": 1},
            {"queue": "test.tasks.w9", "reason": "expired", "count": 1},  # a publisher's
        ],
    }

    assert read_dead_letter(headers) == DeadLetter("rejected", "test.tasks.w0", "broker")
    assert read_dead_letter({}) == DeadLetter("unknown", "", "unknown")


def test_header_keys_that_are_not_text_are_dropped_from_a_dead_letter_not_a_crash() -> None:
    # pika hands over a key that is not valid UTF-8 as bytes; one like it once crashed this.
    sent = {b"\xff\xfe": "odd", b"x-fedq-reason": "forged", "origin": "site-a"}

    headers = dead_letter_headers(sent, "bad_tensor", "fedq.updates", "detail", "site-a")

    assert headers == {
        "origin": "site-a",
        REASON_HEADER: "bad_tensor",
        SOURCE_HEADER: "fedq.updates",
        DETAIL_HEADER: "detail",
        USER_ID_HEADER: "site-a",
    }
