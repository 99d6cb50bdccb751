"""A worker started before the aggregator waits for the updates exchange instead of failing."""

from __future__ import annotations

import threading
import time

import pytest
from memory_job import TOPOLOGY, memory_worker

from broker import MemoryBroker, MemoryTransport
from shared.messages import Hello, decode_message

pytestmark = pytest.mark.timeout(30)


def test_a_worker_started_before_the_topology_exists_says_hello_once_it_is_declared() -> None:
    memory = MemoryBroker()
    worker = memory_worker(memory, wait_for_topology_s=0.05)
    starting = threading.Thread(target=worker.start, daemon=True)

    starting.start()
    time.sleep(0.3)
    waiting = starting.is_alive() and not worker.health.ready
    aggregator = MemoryTransport(memory, TOPOLOGY)
    aggregator.declare()
    aggregator.subscribe(TOPOLOGY.updates)
    starting.join(5)
    delivery = aggregator.receive(1.0)

    assert waiting
    assert not starting.is_alive() and worker.health.ready
    assert delivery is not None and isinstance(decode_message(delivery.body), Hello)


def test_a_worker_waiting_for_the_topology_stops_when_asked() -> None:
    worker = memory_worker(MemoryBroker(), wait_for_topology_s=0.05)
    starting = threading.Thread(target=worker.start, daemon=True)

    starting.start()
    time.sleep(0.2)
    worker.stop()
    starting.join(5)

    assert not starting.is_alive()
