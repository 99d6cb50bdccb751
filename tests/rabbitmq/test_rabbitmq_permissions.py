"""Least privilege on a real RabbitMQ: `fedq broker add-worker` makes a user that can publish
updates and read its own tasks and nothing else, and whose updates carry the broker-validated
user_id the aggregator checks. Each test has a throw-away vhost and users, deleted afterwards."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pytest
from hostile_input import JOB_ID, _update, job
from known_task_key import use_known_key
from prometheus_client import CollectorRegistry

from aggregator.cli import main as fedq_main
from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker.admin import add_worker
from broker.rabbitmq import RabbitMQTransport, ReconnectPolicy
from broker.topology import JOB_ROUTING_KEY, REASON_HEADER, UPDATE_ROUTING_KEY, Topology
from shared.errors import PublishError, TransportError
from shared.messages import Cancel, encode_message

pytestmark = pytest.mark.timeout(120)
PASSWORD = "worker-secret"


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass
class Vhost:
    """A vhost of its own, guest (the admin) on it, and the users made on it."""

    name: str
    base_url: str
    topology: Topology = field(default_factory=lambda: Topology("fedq"))
    users: list[str] = field(default_factory=list)
    transports: list[RabbitMQTransport] = field(default_factory=list)

    def url(self, user: str = "", password: str = "") -> str:
        parts = urlsplit(self.base_url)
        netloc = (
            parts.netloc if not user else f"{user}:{password}@{parts.netloc.rpartition('@')[2]}"
        )
        return urlunsplit(parts._replace(netloc=netloc, path="/" + quote(self.name, safe="")))

    def add_worker(self, name: str) -> str:
        self.users.append(name)
        add_worker(name, PASSWORD, vhost=self.name, topology=self.topology, admin_url=self.url())
        return name

    def transport(self, user: str = "", **kwargs: object) -> RabbitMQTransport:
        transport = RabbitMQTransport(
            self.url(user, PASSWORD if user else ""),
            self.topology,
            reconnect=ReconnectPolicy(base_s=0.1, cap_s=0.5, give_up_s=5.0),
            **kwargs,  # type: ignore[arg-type]
        )
        self.transports.append(transport)
        return transport


@pytest.fixture
def vhost(amqp_url: str) -> Iterator[Vhost]:
    name = f"fedqperm-{uuid.uuid4().hex[:8]}"
    _ctl("add_vhost", name)
    _ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    made = Vhost(name, amqp_url)
    try:
        yield made
    finally:
        for transport in made.transports:
            transport.close()
        for user in made.users:
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True)
        _ctl("delete_vhost", name)


def _worker_transport(vhost: Vhost, name: str) -> RabbitMQTransport:
    return vhost.transport(name, stamp_user_id=True, declare_topology=False)


def _admin_channel(vhost: Vhost) -> tuple[pika.BlockingConnection, object]:
    connection = pika.BlockingConnection(pika.URLParameters(vhost.url()))
    return connection, connection.channel()


def test_a_worker_publishes_updates_with_its_user_id_and_reads_its_own_tasks(
    vhost: Vhost,
) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    worker = _worker_transport(vhost, name)
    worker.declare_worker(name)  # passive: the queue add-worker made is there
    worker.subscribe(vhost.topology.task_queue(name))
    worker.publish(vhost.topology.updates, UPDATE_ROUTING_KEY, b"an update")
    admin = vhost.transport()
    admin.publish(vhost.topology.tasks, name, b"a task")
    delivery = worker.receive(5.0)
    assert delivery is not None and delivery.body == b"a task"
    worker.ack(delivery)
    admin.subscribe(vhost.topology.updates)
    update = admin.receive(5.0)
    assert update is not None and update.body == b"an update" and update.user_id == name
    admin.ack(update)


def test_a_worker_cannot_publish_tasks_or_jobs_read_other_queues_or_declare(
    vhost: Vhost,
) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    other = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    t = vhost.topology
    worker = _worker_transport(vhost, name)
    with pytest.raises(PublishError, match="ACCESS_REFUSED"):
        worker.publish(t.tasks, other, b"a forged model")
    with pytest.raises(PublishError, match="ACCESS_REFUSED"):
        worker.publish(t.tasks, name, b"a model to itself")
    with pytest.raises(PublishError, match="ACCESS_REFUSED"):
        worker.publish(t.jobs, JOB_ROUTING_KEY, b"a job")
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        worker.subscribe(t.task_queue(other))
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        worker.subscribe(t.updates)
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        worker.declare()
    eager = vhost.transport(name)  # a worker that declares its queue actively is refused too
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        eager.declare_worker(name)
    # After all that the worker still works: each refusal closed only a channel.
    worker.publish(t.updates, UPDATE_ROUTING_KEY, b"still fine")


def test_a_worker_account_can_tell_whether_the_updates_exchange_is_there_without_more_rights(
    vhost: Vhost,
) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    worker = _worker_transport(vhost, name)

    there = worker.exchange_exists(vhost.topology.updates)
    missing = worker.exchange_exists(f"{vhost.topology.prefix}.nothing-here")

    assert there and not missing
    worker.publish(vhost.topology.updates, UPDATE_ROUTING_KEY, b"the connection is fine")


def test_the_broker_refuses_a_user_id_that_is_not_the_connections_user(vhost: Vhost) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    worker = _worker_transport(vhost, name)
    worker.user_id = "someone-else"
    with pytest.raises(PublishError, match="PRECONDITION_FAILED"):
        worker.publish(vhost.topology.updates, UPDATE_ROUTING_KEY, b"forged")


def test_the_aggregator_rejects_an_update_claiming_another_workers_id(
    vhost: Vhost, tmp_path: Path
) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    victim = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    t = vhost.topology
    transport = vhost.transport(stamp_user_id=True)
    settings = AggregatorSettings(state_dir=str(use_known_key(tmp_path)), require_user_id=True)
    service = AggregatorService(transport, settings, AggregatorMetrics(CollectorRegistry()))
    transport.declare()
    transport.subscribe(t.jobs)
    transport.subscribe(t.updates)
    transport.publish(t.jobs, JOB_ROUTING_KEY, encode_message(job()))
    service.run_until_idle()
    worker = _worker_transport(vhost, name)
    forged = _update("forged-1", 0, seed=1, worker_id=victim)
    honest = _update("honest-1", 0, seed=2, worker_id=name)
    worker.publish(t.updates, UPDATE_ROUTING_KEY, encode_message(forged))
    worker.publish(t.updates, UPDATE_ROUTING_KEY, encode_message(honest))
    service.run_until_idle(idle_s=0.5)
    running = service._job
    assert running is not None and running.state.version == 1
    connection, channel = _admin_channel(vhost)
    try:
        method, properties, _ = channel.basic_get(t.dead, auto_ack=True)  # type: ignore[attr-defined]
    finally:
        connection.close()
    assert method is not None and properties.headers[REASON_HEADER] == "user_mismatch"


def test_fedq_broker_add_worker_makes_the_user_and_queue(
    vhost: Vhost, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"site-{uuid.uuid4().hex[:6]}"
    vhost.users.append(name)
    assert (
        fedq_main(["broker", "add-worker", name, "--vhost", vhost.name, "--admin-url", vhost.url()])
        == 0
    )
    password = capsys.readouterr().out.strip()
    assert len(password) >= 24
    worker = RabbitMQTransport(
        vhost.url(name, password), vhost.topology, stamp_user_id=True, declare_topology=False
    )
    vhost.transports.append(worker)
    worker.declare_worker(name)
    worker.subscribe(vhost.topology.task_queue(name))


def test_a_worker_account_cannot_cancel_a_job_and_a_submitting_account_can(
    vhost: Vhost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    t = vhost.topology
    transport = vhost.transport()
    settings = AggregatorSettings(state_dir=str(tmp_path))
    service = AggregatorService(transport, settings, AggregatorMetrics(CollectorRegistry()))
    transport.declare()
    transport.subscribe(t.jobs)
    transport.subscribe(t.updates)
    transport.publish(t.jobs, JOB_ROUTING_KEY, encode_message(job()))
    service.run_until_idle()
    worker = _worker_transport(vhost, name)

    with pytest.raises(PublishError, match="ACCESS_REFUSED"):
        worker.publish(t.jobs, JOB_ROUTING_KEY, encode_message(Cancel(JOB_ID)))
    refused = fedq_main(["cancel", JOB_ID, "--broker", vhost.url(name, PASSWORD)])
    refused_err = capsys.readouterr().err
    # The exchange a worker may write: the aggregator takes no cancel from the updates queue.
    worker.publish(t.updates, UPDATE_ROUTING_KEY, encode_message(Cancel(JOB_ID)))
    service.run_until_idle(idle_s=0.5)
    still_running = service._job is not None
    accepted = fedq_main(["cancel", JOB_ID, "--broker", vhost.url()])
    service.run_until_idle(idle_s=0.5)

    assert refused == 1 and "ACCESS_REFUSED" in refused_err
    assert still_running
    connection, channel = _admin_channel(vhost)
    try:
        method, properties, _ = channel.basic_get(t.dead, auto_ack=True)  # type: ignore[attr-defined]
    finally:
        connection.close()
    assert method is not None and properties.headers[REASON_HEADER] == "unexpected_type"
    assert accepted == 0 and service._job is None
    summary = json.loads((tmp_path / "jobs" / JOB_ID / "summary.json").read_text())
    assert summary["stop_reason"] == "cancelled"
