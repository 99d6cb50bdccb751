"""Heartbeats keep a polling service connected; a lost connection is re-opened transparently."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from rabbitmq_scratch import Scratch

from broker.rabbitmq import RabbitMQTransport
from broker.topology import UPDATE_ROUTING_KEY
from broker.transport import Delivery

pytestmark = pytest.mark.rabbitmq

HEARTBEAT_S = 2


def _subscribed_transport(scratch: Scratch, **query: object) -> RabbitMQTransport:
    transport = scratch.transport(scratch.url_with(**query) if query else None)
    transport.declare()
    transport.subscribe(scratch.topology.updates)
    return transport


def _receive_bodies(transport: RabbitMQTransport, count: int, timeout: float) -> list[Delivery]:
    deliveries: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(deliveries) < count and time.monotonic() < deadline:
        delivery = transport.receive(0.5)
        if delivery is not None:
            transport.ack(delivery)
            deliveries.append(delivery)
    return deliveries


@pytest.mark.timeout(30)
def test_the_connection_survives_a_long_training_pause_while_the_loop_keeps_receiving(
    scratch: Scratch,
) -> None:
    transport = _subscribed_transport(scratch, heartbeat=HEARTBEAT_S)
    connections_before = scratch.broker_connection_pids(transport.connection_name)
    training = threading.Thread(target=time.sleep, args=(3.5 * HEARTBEAT_S,))

    training.start()
    polls = 0
    while training.is_alive():  # the service loop: training runs elsewhere, we keep polling
        assert transport.receive(0.5) is None
        polls += 1
    training.join()
    transport.publish(scratch.topology.updates, UPDATE_ROUTING_KEY, b"trained")
    deliveries = _receive_bodies(transport, 1, timeout=5.0)

    assert [d.body for d in deliveries] == [b"trained"]
    assert polls >= 10
    assert transport.reconnects == 0
    assert scratch.broker_connection_pids(transport.connection_name) == connections_before


@pytest.mark.timeout(40)
def test_a_loop_that_stops_polling_loses_the_connection_and_the_next_publish_reconnects(
    scratch: Scratch,
) -> None:
    transport = _subscribed_transport(scratch, heartbeat=HEARTBEAT_S)
    name = transport.connection_name
    assert scratch.broker_connection_pids(name)

    # Training in the service thread itself: nothing answers heartbeats, the broker hangs up.
    deadline = time.monotonic() + 20.0
    while scratch.broker_connection_pids(name) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not scratch.broker_connection_pids(name), "the broker kept a silent connection"
    transport.publish(scratch.topology.updates, UPDATE_ROUTING_KEY, b"after the silence")
    deliveries = _receive_bodies(transport, 1, timeout=5.0)

    assert [d.body for d in deliveries] == [b"after the silence"]
    assert transport.reconnects == 1
    assert len(scratch.broker_connection_pids(name)) == 1


@pytest.mark.timeout(30)
def test_a_connection_closed_by_the_broker_is_reopened_and_held_deliveries_come_again(
    scratch: Scratch,
) -> None:
    transport = _subscribed_transport(scratch)
    updates = scratch.topology.updates
    transport.publish(updates, UPDATE_ROUTING_KEY, b"held across the loss")
    held = transport.receive(5.0)
    assert held is not None and not held.redelivered

    scratch.close_broker_connection(transport.connection_name)
    again = transport.receive(5.0)  # notices the loss, reconnects, re-subscribes
    transport.ack(held)  # a delivery of the dead connection: ignored, not an error
    assert again is not None
    transport.ack(again)
    transport.publish(updates, UPDATE_ROUTING_KEY, b"after the reconnect")
    after = _receive_bodies(transport, 1, timeout=5.0)
    transport.close()

    assert (again.body, again.redelivered) == (b"held across the loss", True)
    assert [d.body for d in after] == [b"after the reconnect"]
    assert transport.reconnects == 1
    assert scratch.wait_for_depth(updates, 1, timeout=1.0) == 0


@pytest.mark.timeout(30)
def test_a_topology_declared_before_the_loss_is_declared_again_after_it(scratch: Scratch) -> None:
    transport = scratch.transport()
    t = scratch.topology
    transport.declare()
    transport.declare_worker(scratch.worker("w1"))
    transport.subscribe(t.task_queue("w1"))
    scratch.close_broker_connection(transport.connection_name)
    # An operator deletes the queues while the service is away; the reconnect restores them.
    for queue in (t.updates, t.task_queue("w1")):
        scratch.channel.queue_delete(queue)

    transport.publish(t.tasks, "w1", b"task after the loss")
    deliveries = _receive_bodies(transport, 1, timeout=5.0)

    assert [(d.body, d.queue) for d in deliveries] == [(b"task after the loss", t.task_queue("w1"))]
    assert scratch.depth(t.updates) == 0  # re-declared: a passive declare would fail otherwise
    assert transport.reconnects == 1


@pytest.mark.timeout(30)
def test_a_lost_connection_is_one_fedq_warning_and_no_pika_error_or_stack(
    scratch: Scratch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    transport = _subscribed_transport(scratch)

    scratch.close_broker_connection(transport.connection_name)
    transport.receive(2.0)  # notices the loss and reconnects
    transport.close()

    assert transport.reconnects == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ["broker.rabbitmq"]
    assert "lost during receive" in warnings[0].getMessage()
    assert warnings[0].exc_info is None
