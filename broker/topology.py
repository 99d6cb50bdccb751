"""Names and arguments of every exchange and queue fedq uses, declared in this one place."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigError
from shared.messages import ID_PATTERN

UPDATE_ROUTING_KEY = "update"
JOB_ROUTING_KEY = "job"
REASON_HEADER = "x-fedq-reason"
SOURCE_HEADER = "x-fedq-source-queue"
DETAIL_HEADER = "x-fedq-detail"
# Deliveries of one message after which RabbitMQ dead-letters it (RabbitMQ 4's default too).
DELIVERY_LIMIT = 20
# The worker id a publisher claims (workers set it on updates): whose chunk sets are whose,
# where no broker-validated user_id says it (docs/protocol.md section 7.3).
SENDER_HEADER = "x-fedq-sender"
# The broker-validated user_id of the message's publisher, copied by the service that
# dead-letters it (the dead-lettered copy is published under the service's own user).
USER_ID_HEADER = "x-fedq-user-id"
# Written by RabbitMQ when it dead-letters a message itself (a reject or nack without requeue,
# a delivery limit): the newest entry first, with the queue it left and why.
DEATH_HEADER = "x-death"
# Header names that belong to the broker (x-death, x-first-death-*, x-delivery-count) and to
# fedq (x-fedq-*): a sender's own are dropped when a service dead-letters its message, so that
# those of a dead letter are its writer's (docs/protocol.md 1.3).
RESERVED_HEADER_PREFIX = "x-"


@dataclass(frozen=True)
class Topology:
    """Exchange and queue names under one prefix (tests use their own prefix to stay apart).

    | exchange        | type   | queue(s)                   | who writes  | who reads  |
    | <p>.jobs        | direct | <p>.jobs (quorum, SAC)     | fedq submit | aggregator |
    | <p>.tasks       | direct | <p>.tasks.<worker> (quorum)| aggregator  | that worker|
    | <p>.updates     | direct | <p>.updates (quorum)       | workers     | aggregator |
    | <p>.dead        | fanout | <p>.dead (quorum)          | aggregator, broker | operators |
    """

    prefix: str = "fedq"

    def __post_init__(self) -> None:
        if not ID_PATTERN.match(self.prefix):
            raise ConfigError(f"invalid topology prefix {self.prefix!r}")

    @property
    def jobs(self) -> str:
        """Exchange and queue of job submissions."""
        return f"{self.prefix}.jobs"

    @property
    def tasks(self) -> str:
        """Exchange of training tasks, routed by worker id."""
        return f"{self.prefix}.tasks"

    def task_queue(self, worker_id: str) -> str:
        """The queue holding one worker's tasks."""
        if not ID_PATTERN.match(worker_id):
            raise ConfigError(f"invalid worker id {worker_id!r}")
        return f"{self.prefix}.tasks.{worker_id}"

    @property
    def updates(self) -> str:
        """Exchange and queue of updates and worker hellos, read by the aggregator."""
        return f"{self.prefix}.updates"

    @property
    def dead(self) -> str:
        """Exchange and queue of dead-lettered messages, each with its reason header."""
        return f"{self.prefix}.dead"

    def queue_arguments(self) -> dict[str, Any]:
        """Arguments of every work queue: quorum type, dead-lettering to the dead exchange."""
        return {"x-queue-type": "quorum", "x-dead-letter-exchange": self.dead}

    def jobs_queue_arguments(self) -> dict[str, Any]:
        """The jobs queue has one active consumer; a standby aggregator waits behind it."""
        return self.queue_arguments() | {"x-single-active-consumer": True}

    def updates_queue_arguments(self) -> dict[str, Any]:
        """The updates queue too: only the active aggregator may take updates."""
        return self.jobs_queue_arguments()

    def delivery_limit_policy(self) -> dict[str, Any]:
        """The RabbitMQ policy (as in a definitions file) that dead-letters a message of the
        updates or a task queue once delivered DELIVERY_LIMIT times: one that kills its
        consumer every time cannot loop for ever. A policy, because a queue argument would
        change the queues' arguments and break their redeclaration. The jobs queue is left
        out: its message stays unacked for a whole job, through every aggregator restart."""
        prefix = re.escape(self.prefix)
        return {
            "name": f"{self.prefix}-delivery-limit",
            "pattern": f"^{prefix}\\.(updates|tasks\\..+)$",
            "apply-to": "queues",
            "definition": {"delivery-limit": DELIVERY_LIMIT},
            "priority": 0,
        }


@dataclass(frozen=True)
class DeadLetter:
    """Why a message is on the dead queue and where it came from, read from trusted headers.

    `by` is "broker" when RabbitMQ dead-lettered it (x-death: a worker refused a task, or a
    delivery limit), "service" when a service published it with its x-fedq-* headers (only the
    aggregator's and operators' accounts may write the dead exchange), "unknown" otherwise.
    """

    reason: str
    queue: str
    by: str


def read_dead_letter(headers: Mapping[str, Any]) -> DeadLetter:
    """Read a dead letter's reason and source queue, trusting only what its writer could set.

    A broker-made dead letter keeps its publisher's headers, x-fedq-* included, so those are
    ignored when x-death is present; its first entry is the broker's newest (a client's own
    x-death entries, which RabbitMQ 3.x merges, come after it).
    """
    deaths = headers.get(DEATH_HEADER)
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        newest = deaths[0]
        return DeadLetter(_text(newest.get("reason")), _text(newest.get("queue")), "broker")
    reason = headers.get(REASON_HEADER)
    if reason is None:
        return DeadLetter("unknown", "", "unknown")
    return DeadLetter(_text(reason), _text(headers.get(SOURCE_HEADER)), "service")


def _text(value: Any) -> str:
    """A header value as text (pika gives AMQP long strings as str or bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
