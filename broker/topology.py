"""Names and arguments of every exchange and queue fedq uses, declared in this one place."""

from __future__ import annotations

import re
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


@dataclass(frozen=True)
class Topology:
    """Exchange and queue names under one prefix (tests use their own prefix to stay apart).

    | exchange        | type   | queue(s)                   | who writes  | who reads  |
    | <p>.jobs        | direct | <p>.jobs (quorum, SAC)     | fedq submit | aggregator |
    | <p>.tasks       | direct | <p>.tasks.<worker> (quorum)| aggregator  | that worker|
    | <p>.updates     | direct | <p>.updates (quorum)       | workers     | aggregator |
    | <p>.dead        | fanout | <p>.dead (quorum)          | services    | operators  |
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
