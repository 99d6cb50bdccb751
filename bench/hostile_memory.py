"""Hostile memory: the RSS rise of the worst messages a site can build within the size limits.

    .venv/bin/python bench/hostile_memory.py [--case NAME]

Fedq issue 10, item 4. Each case runs in a fresh process: it builds its payloads by hand (as
bytes, so building them costs nothing to speak of), resets the kernel's high-water mark
(/proc/self/clear_refs), feeds them to the receiving code of the aggregator (decode_message, or a
transport reassembling chunk sets into a spool as the aggregator's does) and prints the rise of
VmHWM over the RSS before. docs/reliability.md ("Memory bounds") states the bounds these
figures check.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.memory import MemoryBroker, MemoryTransport  # noqa: E402
from broker.spool import ChunkSpool  # noqa: E402
from broker.topology import UPDATE_ROUTING_KEY, Topology  # noqa: E402
from shared.chunks import Reassembler  # noqa: E402
from shared.errors import ProtocolError  # noqa: E402
from shared.messages import (  # noqa: E402
    MAX_MESSAGE_ITEMS,
    MAX_NON_TENSOR_BYTES,
    MAX_TYPE_BYTES,
    decode_message,
)

MIB = 1024 * 1024
HELLO = {
    "protocol": 1,
    "type": "hello",
    "worker_id": "w1",
    "num_samples": 1,
    "device": "cpu",
    "sent_at": 1.0,
}
UPDATE = {
    "protocol": 1,
    "type": "update",
    "job_id": "j",
    "update_id": "u",
    "worker_id": "w1",
    "task_id": "t",
    "base_version": 0,
    "round": None,
    "kind": "weights",
    "num_samples": 1,
    "metrics": {},
    "sent_at": 1.0,
    "tensors": [{"name": "w", "dtype": "float32", "shape": [1], "data": bytes(4)}],
}


def _with_empty_maps(body: dict[str, object], count: int) -> bytes:
    """body with a last key `junk`: an array of `count` empty maps (one byte each)."""
    head = msgpack.packb(body)
    size = len(body) + 1
    header = bytes([0x80 | size]) if size < 16 else b"\xde" + size.to_bytes(2, "big")
    entries = head[1:] if len(body) < 16 else head[3:]
    return (
        header
        + entries
        + msgpack.packb("junk")
        + b"\xdd"
        + count.to_bytes(4, "big")
        + b"\x80" * count
    )


Attack = Callable[[], str]


def _decode(payload: bytes) -> Attack:
    def feed() -> str:
        try:
            decode_message(payload)
        except ProtocolError as e:
            return e.reason
        return "decoded"

    return feed


def hello_12mb() -> Attack:
    """The issue's attack: a 12 MB hello of empty maps."""
    return _decode(_with_empty_maps(HELLO, 12 * MIB))


def hello_at_limit() -> Attack:
    """The worst hello within its limit: 64 KiB of empty maps."""
    return _decode(_with_empty_maps(HELLO, MAX_TYPE_BYTES["hello"] - 200))


def update_items_at_limit() -> Attack:
    """An update whose unknown field holds as many empty maps as the item limit lets it."""
    return _decode(_with_empty_maps(UPDATE, MAX_MESSAGE_ITEMS - 100))


def update_text_at_limit() -> Attack:
    """An update with a str field as large as the bytes outside tensor data may be."""
    return _decode(msgpack.packb(UPDATE | {"junk": "x" * (MAX_NON_TENSOR_BYTES - 1024)}))


def chunk_flood(senders: int = 64, sets: int = 4, data: int = 256 * 1024) -> Attack:
    """The aggregator's limits filled: 256 incomplete sets (64 senders x 4) of 256 KiB received,
    each announcing 16 MiB, spooled as the aggregator spools them."""
    broker = MemoryBroker()
    topology = Topology("bench")
    receiver = MemoryTransport(broker, topology)
    receiver.declare()
    receiver.subscribe(topology.updates)
    for sender in range(senders):
        publisher = MemoryTransport(broker, topology, user=f"site-{sender}")
        for index in range(sets):
            envelope = {
                "protocol": 1,
                "type": "chunk",
                "message_id": f"{sender}-{index}",
                "index": 0,
                "count": 64,
                "total_size": 64 * data,
                "sha256": hashlib.sha256(b"").digest(),
                "data": os.urandom(data),
            }
            publisher.publish(topology.updates, UPDATE_ROUTING_KEY, msgpack.packb(envelope))

    def feed() -> str:
        # The envelopes wait in the (in-process) broker: only the receiver's memory is measured.
        with tempfile.TemporaryDirectory() as spool_dir:
            receiver.hold_chunks(
                Reassembler(
                    max_pending_bytes=4 << 30,
                    max_sets=256,
                    max_set_bytes=512 * MIB,
                    max_sets_per_sender=4,
                    max_bytes_per_sender=1 << 30,
                ),
                ChunkSpool(Path(spool_dir)),
            )
            for _ in range(senders * sets):
                receiver.receive(0)
            pending, held = receiver.chunk_backlog()
        return f"{pending} sets pending, {held / MIB:.0f} MiB received"

    return feed


CASES: dict[str, Callable[[], Attack]] = {
    "hello-12mb-empty-maps": hello_12mb,
    "hello-64kib-empty-maps": hello_at_limit,
    "update-250k-empty-maps": update_items_at_limit,
    "update-8mib-text": update_text_at_limit,
    "chunk-flood-256-sets": chunk_flood,
}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_case(name: str) -> None:
    """Run one case in this process and print its RSS rise."""
    attack = CASES[name]()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    outcome = attack()
    rise = _status("VmHWM") - before
    print(f"{name:26s} {outcome:40s} RSS rise {rise / MIB:7.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES))
    args = parser.parse_args()
    if args.case:
        run_case(args.case)
        return
    for name in CASES:
        subprocess.run([sys.executable, __file__, "--case", name], check=True)


if __name__ == "__main__":
    main()
