"""`fedq status --broker` on a real RabbitMQ: the messages ready in the updates and jobs queues,
read through the broker layer (pika is imported only under broker/)."""

from __future__ import annotations

import re

import pytest
from rabbitmq_scratch import Scratch

from aggregator.status import broker_backlog
from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY, Topology
from shared.errors import FedqError

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(60)]


def test_the_backlog_counts_the_messages_ready_in_the_updates_and_jobs_queues(
    scratch: Scratch,
) -> None:
    t = scratch.topology
    sender = scratch.transport()
    sender.declare()
    for body in (b"one", b"two", b"three"):
        sender.publish(t.updates, UPDATE_ROUTING_KEY, body)
    sender.publish(t.jobs, JOB_ROUTING_KEY, b"a job")
    scratch.wait_for_depth(t.updates, 3)

    assert broker_backlog(scratch.url, t.prefix) == {"updates_ready": 3, "jobs_ready": 1}


def test_the_backlog_of_a_topology_that_is_not_declared_names_the_missing_queue(
    scratch: Scratch,
) -> None:
    missing = Topology(f"{scratch.topology.prefix}-none")

    with pytest.raises(FedqError, match=re.escape(f"queue '{missing.updates}'")):
        broker_backlog(scratch.url, missing.prefix)


def test_the_backlog_of_an_unreachable_broker_says_where_it_looked() -> None:
    with pytest.raises(FedqError, match=re.escape("cannot reach the broker at 127.0.0.1:1")):
        broker_backlog("amqp://guest:guest@127.0.0.1:1/", "fedq")
