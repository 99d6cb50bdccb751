"""Large payloads cross the real broker in checksummed chunks; bad chunk sets are dead-lettered."""

from __future__ import annotations

import hashlib
import os
import time

import msgpack
import pytest
from rabbitmq_scratch import Scratch

from broker.topology import REASON_HEADER, UPDATE_ROUTING_KEY
from broker.transport import Delivery, Transport
from shared.chunks import DEFAULT_CHUNK_SIZE, split_payload

pytestmark = pytest.mark.rabbitmq

# Each AMQP message is a chunk's data plus its msgpack envelope (ids, sizes, a sha256).
ENVELOPE_OVERHEAD = 512


def _receive_whole(transport: Transport, timeout: float) -> Delivery | None:
    """Receive until a whole message is back: receive() may return None between chunks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        delivery = transport.receive(1.0)
        if delivery is not None:
            return delivery
    return None


@pytest.mark.timeout(60)
def test_a_70_mb_payload_crosses_in_chunks_no_larger_than_the_chunk_size(scratch: Scratch) -> None:
    transport = scratch.transport()
    updates = scratch.topology.updates
    transport.declare()
    tap = scratch.tap(updates, UPDATE_ROUTING_KEY)
    transport.subscribe(updates)
    payload = os.urandom(70_000_000)

    transport.publish(updates, UPDATE_ROUTING_KEY, payload, {"worker": "w1"})
    delivery = _receive_whole(transport, 30.0)
    assert delivery is not None
    transport.ack(delivery)

    assert len(delivery.body) == len(payload)
    assert hashlib.sha256(delivery.body).digest() == hashlib.sha256(payload).digest()
    assert delivery.headers["worker"] == "w1"
    sizes = [len(body) for _, body in scratch.take_all(tap)]
    assert len(sizes) == -(-len(payload) // DEFAULT_CHUNK_SIZE)
    assert scratch.depth(updates) == 0  # every envelope was acked as it arrived
    assert max(sizes) <= DEFAULT_CHUNK_SIZE + ENVELOPE_OVERHEAD


def _tampered_envelopes(payload: bytes, chunk_size: int, index: int) -> list[bytes]:
    """Chunk envelopes of a payload with one data byte of chunk `index` flipped."""
    envelopes = split_payload(payload, chunk_size)
    chunk = msgpack.unpackb(envelopes[index], raw=False)
    chunk["data"] = bytes([chunk["data"][0] ^ 0xFF]) + chunk["data"][1:]
    envelopes[index] = msgpack.packb(chunk, use_bin_type=True)
    return envelopes


@pytest.mark.timeout(30)
def test_a_tampered_chunk_set_is_dead_lettered_as_bad_chunk_and_receive_returns_none(
    scratch: Scratch,
) -> None:
    transport = scratch.transport()
    t = scratch.topology
    transport.declare()
    transport.subscribe(t.updates)
    reasons: list[str] = []
    transport.on_reject = reasons.append
    envelopes = _tampered_envelopes(os.urandom(20_000), 4096, index=2)
    for envelope in envelopes:
        transport.publish(t.updates, UPDATE_ROUTING_KEY, envelope)

    results = []
    deadline = time.monotonic() + 10.0
    while scratch.depth(t.dead) < len(envelopes) and time.monotonic() < deadline:
        results.append(transport.receive(0.5))
    transport.close()

    assert results and all(result is None for result in results)
    assert reasons == ["bad_chunk"]
    dead = scratch.take_all(t.dead)
    assert sorted(body for _, body in dead) == sorted(envelopes)
    assert {properties.headers[REASON_HEADER] for properties, _ in dead} == {"bad_chunk"}
    # Acked, not merely held: nothing comes back to the queue once the connection is closed.
    assert scratch.wait_for_depth(t.updates, len(envelopes), timeout=1.0) == 0
