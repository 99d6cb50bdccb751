"""Helpers for tests against a real RabbitMQ: a topology of one's own, a plain pika channel, and an
aggregator running a job on a vhost."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import pika
from hostile_input import job
from known_task_key import use_known_key
from prometheus_client import CollectorRegistry

from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker.admin import add_worker
from broker.rabbitmq import RabbitMQTransport, ReconnectPolicy
from broker.topology import JOB_ROUTING_KEY, Topology
from shared.messages import encode_message

# Starts `python -m SERVICE` on the test's topology: spawn(service, log_name, *argv).
Spawn = Callable[..., subprocess.Popen[bytes]]


def with_query(url: str, **params: object) -> str:
    """Return the URL with these query parameters added."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit(parts._replace(query=query))


def rabbitmqctl_list(command: str, *items: str) -> list[dict[str, Any]]:
    """Run a rabbitmqctl list_* command and return its rows."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", command, *items, "--formatter", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    rows: list[dict[str, Any]] = json.loads(listed.stdout or "[]")
    return rows


@dataclass
class Scratch:
    """A topology of its own on the broker, the transports opened on it, and a plain channel."""

    url: str
    topology: Topology
    channel: Any
    workers: list[str] = field(default_factory=list)
    extra_queues: list[str] = field(default_factory=list)
    transports: list[RabbitMQTransport] = field(default_factory=list)

    def transport(self, url: str | None = None, **kwargs: Any) -> RabbitMQTransport:
        """Open a transport on this topology with a connection name the test can find."""
        kwargs.setdefault("connection_name", f"{self.topology.prefix}-{len(self.transports)}")
        kwargs.setdefault("reconnect", ReconnectPolicy(base_s=0.1, cap_s=1.0, give_up_s=20.0))
        transport = RabbitMQTransport(url or self.url, self.topology, **kwargs)
        self.transports.append(transport)
        return transport

    def worker(self, worker_id: str) -> str:
        """Remember a worker id so that its task queue is deleted afterwards."""
        self.workers.append(worker_id)
        return worker_id

    def tap(self, exchange: str, routing_key: str) -> str:
        """Bind an extra classic queue that sees every AMQP message routed by this key."""
        name = f"{self.topology.prefix}.tap.{len(self.extra_queues)}"
        self.channel.queue_declare(name, durable=False)
        self.channel.queue_bind(name, exchange, routing_key=routing_key)
        self.extra_queues.append(name)
        return name

    def depth(self, queue: str) -> int:
        """Messages ready in a queue."""
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def take_all(self, queue: str) -> list[tuple[Any, bytes]]:
        """Take (properties, body) of every ready message of a queue, acking them."""
        taken: list[tuple[Any, bytes]] = []
        while True:
            method, properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((properties, body))

    def wait_for_depth(self, queue: str, depth: int, timeout: float = 5.0) -> int:
        """Poll a queue until it holds `depth` ready messages or the timeout passes."""
        deadline = time.monotonic() + timeout
        while (current := self.depth(queue)) != depth and time.monotonic() < deadline:
            time.sleep(0.05)
        return current

    def url_with(self, **params: object) -> str:
        """The broker URL with these query parameters (heartbeat=2, ...)."""
        return with_query(self.url, **params)

    def broker_connection_pids(self, connection_name: str) -> list[str]:
        """Ids of the broker's connections with this client-provided name (via rabbitmqctl)."""
        # The table output, not json: close_connection wants the pid as <node.x.y.z>.
        listed = subprocess.run(
            ["rabbitmqctl", "-s", "list_connections", "pid", "client_properties"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        wanted = f'{{"connection_name","{connection_name}"}}'
        rows = (line.split("\t", 1) for line in listed.stdout.splitlines() if "\t" in line)
        return [pid for pid, properties in rows if wanted in properties]

    def close_broker_connection(self, connection_name: str) -> None:
        """Make the broker close a client's connection, as an operator or a failover would."""
        pids = self.broker_connection_pids(connection_name)
        assert pids, f"no broker connection named {connection_name!r}"
        for pid in pids:
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", pid, "closed by a fedq test"],
                check=True,
                capture_output=True,
                timeout=30,
            )

    def cleanup(self) -> None:
        """Close the transports, then delete every queue and exchange under the prefix."""
        for transport in self.transports:
            transport.close()
        t = self.topology
        queues = [t.jobs, t.updates, t.dead, *map(t.task_queue, self.workers), *self.extra_queues]
        # A fresh connection: a test may have left the plain channel closed by the broker.
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            channel = connection.channel()
            for queue in queues:
                channel.queue_delete(queue)
            for exchange in (t.jobs, t.updates, t.dead, t.tasks):
                channel.exchange_delete(exchange)
        finally:
            connection.close()


# The password of every worker account a test makes with Vhost.add_worker.
PASSWORD = "worker-secret"


def ctl(*args: str) -> None:
    """Run rabbitmqctl quietly; fail on a non-zero exit."""
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass
class Vhost:
    """A vhost of its own, guest (the admin) on it, and the users and connections made on it."""

    name: str
    base_url: str
    topology: Topology = field(default_factory=lambda: Topology("fedq"))
    users: list[str] = field(default_factory=list)
    closers: list[Callable[[], object]] = field(default_factory=list)

    def url(self, user: str = "", password: str = "") -> str:
        """The vhost's URL as guest, or as a user with its password."""
        parts = urlsplit(self.base_url)
        netloc = (
            parts.netloc if not user else f"{user}:{password}@{parts.netloc.rpartition('@')[2]}"
        )
        return urlunsplit(parts._replace(netloc=netloc, path="/" + quote(self.name, safe="")))

    def add_worker(self, name: str = "") -> str:
        """Make a worker account as `fedq broker add-worker` does (a random name by default)."""
        name = name or f"site-{uuid.uuid4().hex[:6]}"
        self.users.append(name)
        add_worker(name, PASSWORD, vhost=self.name, topology=self.topology, admin_url=self.url())
        return name

    def transport(self, user: str = "", **kwargs: Any) -> RabbitMQTransport:
        """A transport as guest, or as a user with its password."""
        transport = RabbitMQTransport(
            self.url(user, PASSWORD if user else ""),
            self.topology,
            reconnect=ReconnectPolicy(base_s=0.1, cap_s=0.5, give_up_s=5.0),
            **kwargs,
        )
        self.closers.append(transport.close)
        return transport

    def site(self, user: str) -> RabbitMQTransport:
        """A worker account's transport as a site runs it: user_id stamped, declaring nothing."""
        return self.transport(user, stamp_user_id=True, declare_topology=False)

    def channel(self, user: str = "") -> Any:
        """A plain pika channel with publisher confirms, as guest or as a worker account."""
        connection = pika.BlockingConnection(
            pika.URLParameters(self.url(user, PASSWORD if user else ""))
        )
        self.closers.append(connection.close)
        channel = connection.channel()
        channel.confirm_delivery()
        return channel

    def dead_letters(self) -> list[tuple[Any, bytes]]:
        """(properties, body) of everything on the dead queue, taken off it."""
        channel = self.channel()
        taken = []
        while True:
            method, props, body = channel.basic_get(self.topology.dead, auto_ack=True)
            if method is None:
                return taken
            taken.append((props, body))


def aggregator_with_job(
    vhost: Vhost, state_dir: Path, registry: CollectorRegistry | None = None, **settings: Any
) -> AggregatorService:
    """An aggregator on the vhost as guest (user_id stamped) that requires the broker-validated
    user_id, with the tests' known task key, running hostile_input's job; its metrics in
    `registry` (else a fresh one); `settings` are more AggregatorSettings fields."""
    transport = vhost.transport(stamp_user_id=True)
    settings = {"require_user_id": True} | settings
    service = AggregatorService(
        transport,
        AggregatorSettings(state_dir=str(use_known_key(state_dir)), **settings),
        AggregatorMetrics(registry if registry is not None else CollectorRegistry()),
    )
    transport.declare()
    transport.subscribe(vhost.topology.jobs)
    transport.subscribe(vhost.topology.updates)
    transport.publish(vhost.topology.jobs, JOB_ROUTING_KEY, encode_message(job()))
    service.run_until_idle()
    return service
