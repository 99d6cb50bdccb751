"""A site publishes messages whose AMQP headers the client library cannot decode (a timestamp of
2^63 seconds, arrays nested 5,000 deep): each is dead-lettered once as bad_properties, and the
connection that received it stays up. Before, pika raised while decoding the frame, the
connection dropped, the broker redelivered the message, and the consumer looped for ever.

The hostile site is a least-privilege account of `fedq broker add-worker`, publishing bytes it
wrote itself on the one exchange it may write. Each test has a throw-away vhost and users."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from hostile_input import JOB_ID, _update
from hostile_properties import ODD, POISON, RawProperties, properties
from prometheus_client import CollectorRegistry
from rabbitmq_scratch import Vhost, aggregator_with_job, ctl

from broker.topology import (
    DELIVERY_LIMIT,
    DETAIL_HEADER,
    REASON_HEADER,
    SOURCE_HEADER,
    UPDATE_ROUTING_KEY,
)
from shared.messages import encode_message

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(150)]


@pytest.fixture
def site(vhost: Vhost) -> Vhost:
    """The vhost, by the name these tests read best with."""
    return vhost


def _publish_raw(channel: Any, exchange: str, key: str, body: bytes, encoded: bytes) -> None:
    """Publish a body with properties encoded by hand, byte for byte."""
    channel.basic_publish(exchange, key, body, RawProperties(encoded), mandatory=True)


def test_headers_pika_cannot_decode_are_dead_lettered_once_and_honest_updates_all_count(
    site: Vhost, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    aggregator = aggregator_with_job(site, tmp_path, registry)  # the known key signs the tasks
    honest, hostile = site.add_worker(), site.add_worker()
    t = site.topology
    honest_transport = site.site(honest)
    honest_channel, hostile_channel = site.channel(honest), site.channel(hostile)
    poisons: list[bytes] = []
    # Six honest updates, one version each: the first as fedq sends it, the others with odd
    # properties pika still decodes; after each, a poisoned message from the hostile site.
    odd = sorted(ODD)
    for k in range(6):
        body = encode_message(_update(f"honest-{k}", k, seed=k, worker_id=honest))
        if k == 0:
            honest_transport.publish(t.updates, UPDATE_ROUTING_KEY, body)
        else:
            encoded = properties(user_id=honest, **ODD[odd[k - 1]])
            _publish_raw(honest_channel, t.updates, UPDATE_ROUTING_KEY, body, encoded)
        if k < len(POISON):
            name = sorted(POISON)[k]
            poison = encode_message(_update(f"poison-{k}", k, seed=90 + k, worker_id=hostile))
            encoded = properties(POISON[name], user_id=hostile)
            _publish_raw(hostile_channel, t.updates, UPDATE_ROUTING_KEY, poison, encoded)
            poisons.append(poison)

    deadline = time.monotonic() + 60.0
    while aggregator.jobs_done == 0 and time.monotonic() < deadline:
        aggregator.step(0.1)
    aggregator.run_until_idle(idle_s=0.3)

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    assert aggregator.jobs_done == 1, "the job did not reach its six versions"
    assert value("fedq_aggregator_updates_accepted_total") == 6
    assert value("fedq_aggregator_model_version") == 6
    assert value("fedq_aggregator_updates_rejected_total", reason="bad_properties") == 5
    assert aggregator.transport.reconnects == 0  # type: ignore[attr-defined]
    dead = site.dead_letters()
    assert sorted(body for _, body in dead) == sorted(poisons)
    assert {props.headers[REASON_HEADER] for props, _ in dead} == {"bad_properties"}
    assert {props.headers[SOURCE_HEADER] for props, _ in dead} == {t.updates}
    assert all(hostile in props.headers[DETAIL_HEADER] for props, _ in dead)
    history = (tmp_path / "jobs" / JOB_ID / "summary.json").read_text()
    assert '"stop_reason"' in history


def test_a_worker_refuses_a_task_it_cannot_decode_and_takes_the_next(site: Vhost) -> None:
    name = site.add_worker()
    t = site.topology
    worker = site.site(name)
    worker.dead_letters_by_broker = True  # as every WorkerService: sites may not write <p>.dead
    worker.declare_worker(name)
    worker.subscribe(t.task_queue(name))
    admin = site.channel()
    encoded = properties(POISON["timestamp_2_pow_63"])
    _publish_raw(admin, t.tasks, name, b"a poisoned task", encoded)
    _publish_raw(admin, t.tasks, name, b"the next task", properties())

    delivery = worker.receive(10.0)

    assert delivery is not None and delivery.body == b"the next task"
    worker.ack(delivery)
    assert worker.reconnects == 0
    # Dead-lettered by the broker, with the headers no client decodes: counted, not read here.
    deadline = time.monotonic() + 10.0
    while (dead := _depth(admin, t.dead)) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dead == 1 and _depth(admin, t.task_queue(name)) == 0


def _depth(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def test_the_delivery_limit_policy_dead_letters_a_message_that_keeps_coming_back(
    site: Vhost,
) -> None:
    t = site.topology
    site.transport().declare()
    policy = t.delivery_limit_policy()
    ctl(
        "set_policy",
        "-p",
        site.name,
        "--apply-to",
        policy["apply-to"],
        "--priority",
        str(policy["priority"]),
        policy["name"],
        policy["pattern"],
        json.dumps(policy["definition"]),
    )
    channel = site.channel()
    channel.basic_publish(t.updates, UPDATE_ROUTING_KEY, b"kills its consumer", mandatory=True)

    deliveries: list[int] = []

    def die(ch: Any, method: Any, _properties: Any, _body: bytes) -> None:
        deliveries.append(method.delivery_tag)
        ch.basic_nack(method.delivery_tag, requeue=True)  # as a consumer that dies would

    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(t.updates, die)
    observer = site.channel()
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline and len(deliveries) <= 2 * DELIVERY_LIMIT:
        channel.connection.process_data_events(time_limit=0.1)
        if observer.queue_declare(t.dead, passive=True).method.message_count:
            break

    (dead,) = site.dead_letters()
    assert dead[1] == b"kills its consumer"
    assert DELIVERY_LIMIT <= len(deliveries) <= DELIVERY_LIMIT + 1
    assert dead[0].headers["x-death"][0]["reason"] == "delivery_limit"
