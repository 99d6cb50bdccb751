"""A site floods the aggregator with chunk sets it never completes (fedq issue 10, item 3): with
the least-privilege accounts of `fedq broker add-worker` and require_user_id, its sets count
against its own bounds, so an honest site's update in chunks is still folded in."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest
from hostile_input import _update
from rabbitmq_scratch import Vhost, aggregator_with_job

from broker.topology import UPDATE_ROUTING_KEY, read_dead_letter
from shared.chunks import split_payload
from shared.messages import encode_message

pytestmark = pytest.mark.timeout(180)
MAX_MESSAGE_BYTES = 1024 * 1024
FLOOD = 40


def _dead_reasons(vhost: Vhost) -> Counter[str]:
    return Counter(read_dead_letter(props.headers).reason for props, _ in vhost.dead_letters())


def test_a_flood_of_never_completed_chunk_sets_does_not_keep_an_honest_update_out(
    vhost: Vhost, tmp_path: Path
) -> None:
    mallory = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    alice = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    t = vhost.topology
    service = aggregator_with_job(
        vhost,
        tmp_path,
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_chunk_pending_bytes=4 * MAX_MESSAGE_BYTES,
        max_chunk_pending_bytes_per_sender=2 * MAX_MESSAGE_BYTES,
    )
    # Mallory's first envelopes of sets announcing the largest message, never followed.
    attacker = vhost.site(mallory)
    for _ in range(FLOOD):
        first = split_payload(bytes(MAX_MESSAGE_BYTES), 16 * 1024)[0]
        attacker.publish(t.updates, UPDATE_ROUTING_KEY, first)
    honest = vhost.site(alice)
    honest.chunk_size = 32 * 1024
    body = encode_message(_update("honest-1", 0, seed=2, worker_id=alice))
    assert len(split_payload(body, honest.chunk_size)) > 1
    honest.publish(t.updates, UPDATE_ROUTING_KEY, body)

    service.run_until_idle(idle_s=0.5)

    running = service._job
    assert running is not None and running.state.version == 1
    # Mallory keeps two sets (its 2 MiB); each other set of its is refused, counted once.
    assert _dead_reasons(vhost) == Counter({"chunk_limit": FLOOD - 2})
    assert service.transport.chunk_backlog()[0] == 2
