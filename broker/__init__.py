"""Messaging for fedq: the Transport protocol, RabbitMQ and in-process implementations."""

from __future__ import annotations

from broker.memory import MemoryBroker, MemoryTransport
from broker.topology import Topology
from broker.transport import Delivery, Transport

__all__ = ["Delivery", "MemoryBroker", "MemoryTransport", "Topology", "Transport", "connect"]


def connect(
    url: str,
    topology: Topology,
    memory: MemoryBroker | None = None,
    chunk_size: int | None = None,
    *,
    stamp_user_id: bool = False,
    user: str | None = None,
    declare_topology: bool = True,
    prefetch: int | None = None,
) -> Transport:
    """Open a transport: "memory" for the in-process broker, amqp(s):// for RabbitMQ.

    stamp_user_id: publish with user_id set to the connection's user (which RabbitMQ validates);
    the in-process broker has no users and stamps `user` instead. declare_topology=False: a
    worker only checks its task queue passively (RabbitMQ; a least-privilege deployment).
    prefetch: messages RabbitMQ may deliver ahead of acks, per consumer (default 64).
    """
    from shared.chunks import DEFAULT_CHUNK_SIZE
    from shared.errors import ConfigError

    size = chunk_size or DEFAULT_CHUNK_SIZE
    if url == "memory":
        if memory is None:
            raise ConfigError(
                "--broker memory only works inside `fedq run`, where every service shares one "
                "process; give separate services an amqp:// URL"
            )
        return MemoryTransport(memory, topology, size, user=user if stamp_user_id else None)
    if url.startswith(("amqp://", "amqps://")):
        from broker.rabbitmq import DEFAULT_PREFETCH, RabbitMQTransport

        return RabbitMQTransport(
            url,
            topology,
            size,
            prefetch_count=prefetch or DEFAULT_PREFETCH,
            stamp_user_id=stamp_user_id,
            declare_topology=declare_topology,
        )
    raise ConfigError(f"unsupported broker URL {url!r}: use 'memory' or amqp(s)://...")
