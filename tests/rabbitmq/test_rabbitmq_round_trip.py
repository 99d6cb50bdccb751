"""RabbitMQTransport on a real broker: declare, publish, receive and settle whole messages."""

from __future__ import annotations

import time
from typing import Any

import pytest
from rabbitmq_scratch import Scratch, rabbitmqctl_list

from broker import connect
from broker.rabbitmq import RECV_BYTES, RabbitMQTransport
from broker.topology import REASON_HEADER, SOURCE_HEADER, UPDATE_ROUTING_KEY

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(30)]


def _updates_transport(scratch: Scratch, **kwargs: Any) -> RabbitMQTransport:
    transport = scratch.transport(**kwargs)
    transport.declare()
    transport.subscribe(scratch.topology.updates)
    return transport


def _queue_is_empty_for_a_new_consumer(scratch: Scratch, queue: str) -> bool:
    """Nothing ready and nothing comes back unacked: the messages were really settled."""
    fresh = scratch.transport()
    fresh.subscribe(queue)
    return fresh.receive(1.0) is None and scratch.depth(queue) == 0


def test_a_published_update_is_received_with_its_headers_and_acked_for_good(
    scratch: Scratch,
) -> None:
    transport = _updates_transport(scratch)
    updates = scratch.topology.updates

    transport.publish(updates, UPDATE_ROUTING_KEY, b"update-1", {"x-test": "yes"})
    delivery = transport.receive(5.0)
    assert delivery is not None
    transport.ack(delivery)
    transport.close()

    assert (delivery.body, delivery.queue, delivery.redelivered) == (b"update-1", updates, False)
    assert delivery.headers["x-test"] == "yes"
    assert _queue_is_empty_for_a_new_consumer(scratch, updates)


def test_a_nacked_delivery_comes_back_marked_redelivered(scratch: Scratch) -> None:
    transport = _updates_transport(scratch)
    transport.publish(scratch.topology.updates, UPDATE_ROUTING_KEY, b"try again")
    first = transport.receive(5.0)
    assert first is not None and not first.redelivered

    transport.nack(first, requeue=True)
    second = transport.receive(5.0)

    assert second is not None
    assert (second.body, second.redelivered) == (b"try again", True)


def test_a_rejected_delivery_lands_on_the_dead_queue_with_its_reason(scratch: Scratch) -> None:
    transport = _updates_transport(scratch)
    reasons: list[str] = []
    transport.on_reject = reasons.append
    t = scratch.topology
    transport.publish(t.updates, UPDATE_ROUTING_KEY, b"stale update")
    delivery = transport.receive(5.0)
    assert delivery is not None

    transport.reject(delivery, "stale")
    transport.close()

    dead = scratch.take_all(t.dead)
    assert [(p.headers[REASON_HEADER], p.headers[SOURCE_HEADER], body) for p, body in dead] == [
        ("stale", t.updates, b"stale update")
    ]
    assert reasons == ["stale"]
    assert _queue_is_empty_for_a_new_consumer(scratch, t.updates)


def test_a_nack_without_requeue_is_dead_lettered_by_the_broker(scratch: Scratch) -> None:
    transport = _updates_transport(scratch)
    t = scratch.topology
    transport.publish(t.updates, UPDATE_ROUTING_KEY, b"poison")
    delivery = transport.receive(5.0)
    assert delivery is not None

    transport.nack(delivery, requeue=False)

    assert scratch.wait_for_depth(t.dead, 1) == 1
    [(properties, body)] = scratch.take_all(t.dead)
    assert body == b"poison"
    assert properties.headers["x-death"][0]["queue"] == t.updates


def test_a_task_reaches_only_the_worker_it_is_routed_to(scratch: Scratch) -> None:
    transport = scratch.transport()
    t = scratch.topology
    for worker_id in (scratch.worker("w1"), scratch.worker("w2")):
        transport.declare_worker(worker_id)
    transport.declare_worker("w1")  # declaring again is harmless
    transport.subscribe(t.task_queue("w2"))

    transport.publish(t.tasks, "w2", b"task for w2")
    delivery = transport.receive(5.0)

    assert delivery is not None
    assert (delivery.body, delivery.queue) == (b"task for w2", t.task_queue("w2"))
    assert scratch.depth(t.task_queue("w1")) == 0


def test_messages_are_persistent_and_carry_their_headers_on_the_wire(scratch: Scratch) -> None:
    transport = scratch.transport()
    transport.declare()
    tap = scratch.tap(scratch.topology.updates, UPDATE_ROUTING_KEY)

    transport.publish(scratch.topology.updates, UPDATE_ROUTING_KEY, b"x", {"worker": "w1"})

    [(properties, body)] = scratch.take_all(tap)
    assert (properties.delivery_mode, properties.headers, body) == (2, {"worker": "w1"}, b"x")


def test_the_declared_queues_are_durable_quorum_queues_that_dead_letter(scratch: Scratch) -> None:
    transport = scratch.transport()
    t = scratch.topology

    transport.declare()
    transport.declare()
    transport.declare_worker(scratch.worker("w1"))

    listed = rabbitmqctl_list("list_queues", "name", "durable", "type", "arguments")

    queues = {q["name"]: q for q in listed if q["name"].startswith(t.prefix)}
    assert sorted(queues) == sorted([t.jobs, t.updates, t.dead, t.task_queue("w1")])
    assert all(q["durable"] and q["type"] == "quorum" for q in queues.values())
    for name in (t.jobs, t.updates, t.task_queue("w1")):
        assert ["x-dead-letter-exchange", "longstr", t.dead] in queues[name]["arguments"]
    for name in (t.jobs, t.updates):
        assert ["x-single-active-consumer", "bool", True] in queues[name]["arguments"]
    assert not any(a[0] == "x-dead-letter-exchange" for a in queues[t.dead]["arguments"])


def test_connect_passes_the_prefetch_on_to_the_rabbitmq_transport(scratch: Scratch) -> None:
    transport = connect(scratch.url, scratch.topology, prefetch=3)
    try:
        assert isinstance(transport, RabbitMQTransport) and transport.prefetch_count == 3
    finally:
        transport.close()


def test_prefetch_bounds_the_deliveries_held_by_the_client(scratch: Scratch) -> None:
    transport = _updates_transport(scratch, prefetch_count=3)
    updates = scratch.topology.updates
    for index in range(10):
        transport.publish(updates, UPDATE_ROUTING_KEY, f"update-{index}".encode())

    assert transport.receive(5.0) is not None
    time.sleep(0.5)  # give the broker time to push more than the prefetch, were it unbounded

    assert scratch.depth(updates) == 7


def test_purge_drops_the_ready_messages_and_counts_them(scratch: Scratch) -> None:
    transport = scratch.transport()
    transport.declare()
    for index in range(3):
        transport.publish(scratch.topology.jobs, "job", f"job-{index}".encode())

    dropped = transport.purge(scratch.topology.jobs)

    assert (dropped, scratch.depth(scratch.topology.jobs)) == (3, 0)


def test_the_transport_reads_the_socket_in_large_pieces_and_still_round_trips(
    scratch: Scratch,
) -> None:
    transport = _updates_transport(scratch)
    try:
        body = bytes(range(256)) * 40_000  # 10 MB: chunks of 8 MiB and the rest
        transport.publish(scratch.topology.updates, UPDATE_ROUTING_KEY, body)
        delivery = transport.receive(10)
        assert delivery is not None and delivery.body == body
        transport.ack(delivery)
        assert transport._connection._impl._transport._MAX_RECV_BYTES == RECV_BYTES
    finally:
        transport.close()
