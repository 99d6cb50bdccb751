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
) -> Transport:
    """Open a transport: "memory" for the in-process broker, amqp(s):// for RabbitMQ."""
    from shared.chunks import DEFAULT_CHUNK_SIZE
    from shared.errors import ConfigError

    size = chunk_size or DEFAULT_CHUNK_SIZE
    if url == "memory":
        if memory is None:
            raise ConfigError(
                "--broker memory only works inside `fedq run`, where every service shares one "
                "process; give separate services an amqp:// URL"
            )
        return MemoryTransport(memory, topology, size)
    if url.startswith(("amqp://", "amqps://")):
        from broker.rabbitmq import RabbitMQTransport

        return RabbitMQTransport(url, topology, size)
    raise ConfigError(f"unsupported broker URL {url!r}: use 'memory' or amqp(s)://...")
