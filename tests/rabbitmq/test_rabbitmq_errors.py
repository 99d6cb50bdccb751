"""Broker refusals surface as fedq errors (never pika's), and the transport stays usable after."""

from __future__ import annotations

import time

import pytest
from rabbitmq_scratch import Scratch

from broker.rabbitmq import RabbitMQTransport, ReconnectPolicy
from broker.topology import UPDATE_ROUTING_KEY, Topology
from shared.errors import ConnectionLostError, PublishError, TransportError

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(30)]


def _round_trip_works(transport: RabbitMQTransport, scratch: Scratch, body: bytes) -> bool:
    transport.subscribe(scratch.topology.updates)
    transport.publish(scratch.topology.updates, UPDATE_ROUTING_KEY, body)
    delivery = transport.receive(5.0)
    if delivery is None:
        return False
    transport.ack(delivery)
    return delivery.body == body


def test_publishing_with_no_bound_queue_raises_publish_error(scratch: Scratch) -> None:
    transport = scratch.transport()
    transport.declare()

    with pytest.raises(PublishError, match="unroutable"):
        transport.publish(scratch.topology.tasks, "no-such-worker", b"task")
    with pytest.raises(PublishError, match="unroutable"):
        transport.publish(scratch.topology.updates, "wrong-key", b"update")

    assert _round_trip_works(transport, scratch, b"still fine")


def test_publishing_to_a_missing_exchange_raises_publish_error_and_the_transport_recovers(
    scratch: Scratch,
) -> None:
    transport = scratch.transport()
    transport.declare()

    with pytest.raises(PublishError, match="404"):
        transport.publish(f"{scratch.topology.prefix}.missing", "key", b"lost")

    assert _round_trip_works(transport, scratch, b"after the channel closed")


def test_subscribing_to_a_missing_queue_raises_transport_error(scratch: Scratch) -> None:
    transport = scratch.transport()
    transport.declare()

    with pytest.raises(TransportError, match="404"):
        transport.subscribe(f"{scratch.topology.prefix}.missing")

    assert _round_trip_works(transport, scratch, b"subscriptions still work")


def test_declaring_over_a_queue_with_other_arguments_raises_transport_error(
    scratch: Scratch,
) -> None:
    scratch.channel.queue_declare(scratch.topology.updates, durable=True)  # a classic queue
    transport = scratch.transport()

    with pytest.raises(TransportError, match="PRECONDITION_FAILED"):
        transport.declare()


def test_a_closed_transport_refuses_to_publish_or_receive(scratch: Scratch) -> None:
    transport = scratch.transport()
    transport.declare()
    transport.close()

    with pytest.raises(TransportError, match="closed"):
        transport.publish(scratch.topology.updates, UPDATE_ROUTING_KEY, b"late")
    with pytest.raises(TransportError, match="closed"):
        transport.receive(0)
    transport.close()  # closing twice is harmless


def test_wrong_credentials_fail_at_once_without_retrying(scratch: Scratch) -> None:
    url = scratch.url.replace("guest:guest@", "guest:wrong@")
    started = time.monotonic()

    with pytest.raises(TransportError, match="refused") as raised:
        RabbitMQTransport(url, scratch.topology, reconnect=ReconnectPolicy(give_up_s=20.0))

    assert not isinstance(raised.value, ConnectionLostError)
    assert "wrong" not in str(raised.value)
    assert time.monotonic() - started < 5.0


@pytest.mark.timeout(15)
def test_an_unreachable_broker_gives_up_with_connection_lost_error() -> None:
    policy = ReconnectPolicy(base_s=0.05, cap_s=0.2, give_up_s=1.0)
    started = time.monotonic()

    with pytest.raises(ConnectionLostError, match=r"guest:\*\*\*@127\.0\.0\.1:1"):
        RabbitMQTransport("amqp://guest:secret@127.0.0.1:1/%2F", Topology("t"), reconnect=policy)

    assert 0.5 < time.monotonic() - started < 5.0
