"""Chunk envelopes are acked once spooled: an update in chunks survives an aggregator crash at
any point and is folded exactly once; sets over the limits are refused with a reason, once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from known_task_key import task_id
from memory_job import (
    JOB_ID,
    SHAPES,
    TOPOLOGY,
    aggregator,
    broker_with_job,
    dead_letters,
    fedbuff_spec,
    read_history,
)

from broker import MemoryBroker
from broker.topology import UPDATE_ROUTING_KEY
from shared.chunks import split_payload
from shared.messages import Update, encode_message

pytestmark = pytest.mark.timeout(60)
CHUNK_SIZE = 4096


def _envelopes(update_id: str, base: int, value: float) -> list[bytes]:
    """w0's FedBuff update, every parameter moved by `value`, as chunk envelopes."""
    tensors = {name: np.full(a.shape, value, a.dtype) for name, a in SHAPES.items()}
    task = task_id(JOB_ID, "w0", base)
    update = Update(JOB_ID, update_id, "w0", task, base, None, "delta", 10, tensors,
                    {"loss": 1.0}, sent_at=0.0)  # fmt: skip
    return split_payload(encode_message(update), CHUNK_SIZE)


def _route(memory: MemoryBroker, envelopes: list[bytes]) -> None:
    for body in envelopes:
        memory.route(TOPOLOGY.updates, UPDATE_ROUTING_KEY, body, {})


def test_an_update_in_more_envelopes_than_any_prefetch_is_folded_with_every_envelope_acked_at_once(
    tmp_path: Path,
) -> None:
    memory, _ = broker_with_job(fedbuff_spec(buffer_size=1, max_versions=1))
    envelopes = _envelopes("u1", 0, 0.01)
    service = aggregator(memory, tmp_path)

    _route(memory, envelopes)
    service.run_until_idle()

    assert len(envelopes) > 32  # the aggregator's default prefetch
    assert [h["update_ids"] for h in read_history(tmp_path)[1:]] == [["u1"]]
    assert memory.depth(TOPOLOGY.updates) == 0
    assert [reason for reason, _ in dead_letters(memory)] == []


def test_half_a_chunk_set_received_before_a_crash_completes_after_the_restart(
    tmp_path: Path,
) -> None:
    memory, _ = broker_with_job(fedbuff_spec(buffer_size=1, max_versions=1))
    envelopes = _envelopes("u1", 0, 0.01)
    first = aggregator(memory, tmp_path)
    _route(memory, envelopes[:20])
    first.run_until_idle()
    first.transport.close()  # the crash; the 20 envelopes were acked: the spool holds them

    second = aggregator(memory, tmp_path)
    second.run_until_idle()
    _route(memory, envelopes[20:])
    second.run_until_idle()

    assert memory.depth(TOPOLOGY.updates) == 0
    assert [h["update_ids"] for h in read_history(tmp_path)[1:]] == [["u1"]]
    assert [reason for reason, _ in dead_letters(memory)] == []


def test_a_reassembled_update_folded_but_not_checkpointed_before_a_crash_is_folded_once_after(
    tmp_path: Path,
) -> None:
    memory, _ = broker_with_job(fedbuff_spec(buffer_size=2, max_versions=1))
    first = aggregator(memory, tmp_path)
    _route(memory, _envelopes("u1", 0, 0.01))
    first.run_until_idle()
    folded_before_crash = first.status()["updates_accepted"]
    first.transport.close()  # u1 is in the buffer, its checkpoint not yet written

    second = aggregator(memory, tmp_path)
    second.run_until_idle()  # the job resumes and takes u1 back from the spool
    _route(memory, _envelopes("u2", 0, 0.02))
    second.run_until_idle()

    assert folded_before_crash == 1
    assert [h["update_ids"] for h in read_history(tmp_path)[1:]] == [["u1", "u2"]]
    assert [reason for reason, _ in dead_letters(memory)] == []
    assert list((tmp_path / "chunks").iterdir()) == []  # settled sets leave the spool


def test_a_set_announcing_more_than_the_largest_message_is_refused_once_and_intake_goes_on(
    tmp_path: Path,
) -> None:
    memory, _ = broker_with_job(fedbuff_spec(buffer_size=1, max_versions=1))
    service = aggregator(memory, tmp_path, max_message_bytes=256 * 1024)
    huge = split_payload(bytes(400 * 1024), CHUNK_SIZE)

    _route(memory, huge[:5])
    _route(memory, _envelopes("u1", 0, 0.01))
    service.run_until_idle()

    reasons = [reason for reason, _ in dead_letters(memory)]
    assert reasons == ["too_large"] * 5  # every envelope dead-lettered, none lost
    rejected = service.metrics.updates_rejected.labels("too_large")._value.get()
    assert rejected == 1  # the set counts once
    assert [h["update_ids"] for h in read_history(tmp_path)[1:]] == [["u1"]]


def test_a_new_set_past_the_set_count_limit_is_refused_as_chunk_limit_while_held_sets_complete(
    tmp_path: Path,
) -> None:
    memory, _ = broker_with_job(fedbuff_spec(buffer_size=2, max_versions=1))
    service = aggregator(memory, tmp_path, max_chunk_sets=2)
    first, second, third = (_envelopes(f"u{i}", 0, 0.01 * i) for i in (1, 2, 3))

    _route(memory, [first[0], second[0], third[0]])
    _route(memory, first[1:] + second[1:] + third[1:])
    service.run_until_idle()

    reasons = [reason for reason, _ in dead_letters(memory)]
    assert set(reasons) == {"chunk_limit"} and len(reasons) == len(third)
    assert [h["update_ids"] for h in read_history(tmp_path)[1:]] == [["u1", "u2"]]
