"""Tests of chunking: splitting payloads into envelopes and reassembling them, and failures."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.chunks import (
    MAX_CHUNK_COUNT,
    Chunk,
    ChunkSetError,
    Reassembler,
    decode_chunk,
    is_chunk,
    split_payload,
)
from shared.errors import ChunkError
from shared.messages import Hello, encode_message

SHA = hashlib.sha256(b"payload").digest()


def payload_of(size: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(size))


def envelope(**changes: Any) -> bytes:
    """A hand-made envelope: chunk 0 of a 2-chunk set of 8 bytes, with some fields replaced."""
    body = {
        "protocol": 1,
        "type": "chunk",
        "message_id": "m1",
        "index": 0,
        "count": 2,
        "total_size": 8,
        "sha256": SHA,
        "data": b"abcd",
    }
    return msgpack.packb(body | changes, use_bin_type=True)


def chunks_of(payload: bytes, chunk_size: int = 1024) -> list[Chunk]:
    return [decode_chunk(part) for part in split_payload(payload, chunk_size)]


def feed(reassembler: Reassembler[int], chunks: list[Chunk]) -> list[Any]:
    """Add chunks with their position as key; return every add's result."""
    return [reassembler.add(chunk, key) for key, chunk in enumerate(chunks)]


def expect_set_error(
    reassembler: Reassembler[int], chunks: list[Chunk], reason: str = "bad_chunk"
) -> ChunkSetError:
    with pytest.raises(ChunkSetError) as caught:
        feed(reassembler, chunks)
    assert caught.value.reason == reason
    return caught.value


# ------------------------------------------------------------------ splitting


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 12_000),
    chunk_size=st.integers(1024, 4096),
    data=st.data(),
)
def test_a_split_payload_reassembles_in_any_order(size: int, chunk_size: int, data: Any) -> None:
    payload = payload_of(size)
    parts = split_payload(payload, chunk_size)
    if len(parts) == 1:
        assert parts == [payload]
        return
    chunks = [decode_chunk(part) for part in parts]
    order = data.draw(st.permutations(range(len(chunks))))
    reassembler: Reassembler[int] = Reassembler()

    results = [reassembler.add(chunks[i], i) for i in order]

    assert results[:-1] == [None] * (len(chunks) - 1)
    whole, keys = results[-1]
    assert whole == payload
    assert sorted(keys) == list(range(len(chunks)))
    assert reassembler.pending_bytes == 0


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1025, 6000), duplicates=st.lists(st.integers(0, 5), max_size=4))
def test_duplicate_chunks_are_ignored_but_settled_with_their_set(
    size: int, duplicates: list[int]
) -> None:
    chunks = chunks_of(payload_of(size))
    # Repeats of chunks already held, arriving before the set is complete.
    repeats = [chunks[i % (len(chunks) - 1)] for i in duplicates]
    arrivals = chunks[:-1] + repeats + chunks[-1:]
    reassembler: Reassembler[int] = Reassembler()

    results = feed(reassembler, arrivals)

    whole, keys = results[-1]
    assert whole == payload_of(size)
    assert sorted(keys) == list(range(len(arrivals)))
    assert all(result is None for result in results[:-1])


def test_a_payload_that_fits_is_sent_as_it_is() -> None:
    payload = encode_message(Hello("w1", 10, "cpu", sent_at=1.0))

    parts = split_payload(payload, 1024)

    assert parts == [payload]
    assert not is_chunk(payload)


def test_a_payload_of_exactly_the_chunk_size_is_not_chunked() -> None:
    payload = payload_of(1024)

    assert split_payload(payload, 1024) == [payload]


def test_envelopes_carry_the_set_fields_and_the_checksum_of_the_whole_payload() -> None:
    payload = payload_of(2500)

    parts = split_payload(payload, 1024)

    chunks = [decode_chunk(part) for part in parts]
    assert all(is_chunk(part) for part in parts)
    assert [c.index for c in chunks] == [0, 1, 2]
    assert {(c.message_id, c.count, c.total_size) for c in chunks} == {
        (chunks[0].message_id, 3, 2500)
    }
    assert all(c.sha256 == hashlib.sha256(payload).digest() for c in chunks)
    assert [len(c.data) for c in chunks] == [1024, 1024, 452]


def test_every_split_gets_a_fresh_message_id() -> None:
    payload = payload_of(3000)

    first, second = chunks_of(payload)[0], chunks_of(payload)[0]

    assert first.message_id != second.message_id


def test_a_chunk_size_under_one_kib_is_refused() -> None:
    with pytest.raises(ValueError):
        split_payload(payload_of(5000), 1023)


def test_a_payload_needing_more_than_the_chunk_limit_is_refused() -> None:
    payload = bytes(1024 * MAX_CHUNK_COUNT + 1)

    with pytest.raises(ChunkError) as caught:
        split_payload(payload, 1024)

    assert caught.value.reason == "bad_chunk"


# ------------------------------------------------------------------ reassembly failures


def test_a_checksum_mismatch_fails_the_set_with_all_its_keys() -> None:
    chunks = chunks_of(payload_of(3000))
    tampered = bytearray(chunks[1].data)
    tampered[10] ^= 0xFF
    chunks[1].data = bytes(tampered)
    reassembler: Reassembler[int] = Reassembler()

    error = expect_set_error(reassembler, chunks)

    assert error.keys == [0, 1, 2]
    assert reassembler.pending_bytes == 0


@pytest.mark.parametrize("field", ["count", "total_size", "sha256"])
def test_a_chunk_that_disagrees_with_its_set_fails_the_whole_set(field: str) -> None:
    chunks = chunks_of(payload_of(3000))
    other = {"count": 4, "total_size": 3001, "sha256": bytes(32)}[field]
    setattr(chunks[1], field, other)
    reassembler: Reassembler[int] = Reassembler()

    error = expect_set_error(reassembler, chunks[:2])

    assert error.keys == [0, 1]
    assert reassembler.pending_bytes == 0


def test_chunks_holding_more_bytes_than_the_total_fail_the_set() -> None:
    chunks = chunks_of(payload_of(3000))
    chunks[1].data = chunks[1].data + b"x" * 1000
    reassembler: Reassembler[int] = Reassembler()

    error = expect_set_error(reassembler, chunks[:2])

    assert error.keys == [0, 1]


def test_a_set_larger_than_the_largest_message_is_refused_as_too_large_at_its_first_chunk() -> None:
    chunks = chunks_of(payload_of(5000))
    reassembler: Reassembler[int] = Reassembler(max_set_bytes=4096)

    error = expect_set_error(reassembler, chunks[:1], "too_large")

    assert error.keys == [0]
    assert error.first
    assert reassembler.pending_bytes == 0 and reassembler.pending_sets == 0


def test_later_envelopes_of_a_refused_set_are_refused_with_the_same_reason_but_not_first() -> None:
    chunks = chunks_of(payload_of(5000))
    reassembler: Reassembler[int] = Reassembler(max_set_bytes=4096)
    expect_set_error(reassembler, chunks[:1], "too_large")

    with pytest.raises(ChunkSetError) as caught:
        reassembler.add(chunks[1], 1)

    assert caught.value.reason == "too_large"
    assert caught.value.keys == [1]
    assert not caught.value.first
    assert reassembler.pending_sets == 0


def test_a_new_set_past_the_set_count_limit_is_refused_while_the_held_ones_complete() -> None:
    first, second, third = (chunks_of(payload_of(1500 + i)) for i in range(3))
    reassembler: Reassembler[int] = Reassembler(max_sets=2)
    reassembler.add(first[0], 10)
    reassembler.add(second[0], 20)

    with pytest.raises(ChunkSetError) as caught:
        reassembler.add(third[0], 30)
    completed = reassembler.add(first[1], 11)

    assert caught.value.reason == "chunk_limit"
    assert completed is not None and completed[0] == payload_of(1500)
    assert reassembler.pending_sets == 1


def test_a_new_set_whose_size_would_pass_the_pending_bytes_limit_is_refused() -> None:
    held, new = chunks_of(payload_of(1500)), chunks_of(payload_of(1500))
    reassembler: Reassembler[int] = Reassembler(max_pending_bytes=2000, max_set_bytes=2000)
    reassembler.add(held[0], 1)

    with pytest.raises(ChunkSetError) as caught:
        reassembler.add(new[0], 2)

    assert caught.value.reason == "chunk_limit"
    assert reassembler.pending_sets == 1 and reassembler.pending_bytes == 1024


def test_holds_tells_an_envelope_already_held_from_a_new_one() -> None:
    chunks = chunks_of(payload_of(3000))
    reassembler: Reassembler[int] = Reassembler()
    reassembler.add(chunks[0], 0)

    assert reassembler.holds(chunks[0])
    assert not reassembler.holds(chunks[1])


def test_a_failed_set_is_forgotten_so_that_a_resend_starts_afresh() -> None:
    chunks = chunks_of(payload_of(3000))
    good = [Chunk(**vars(c)) for c in chunks]
    chunks[0].data = bytes(len(chunks[0].data))
    reassembler: Reassembler[int] = Reassembler()
    expect_set_error(reassembler, chunks)

    results = feed(reassembler, good)

    assert results[-1][0] == payload_of(3000)


# ------------------------------------------------------------------ expiry


def test_expire_hands_back_an_incomplete_set_once_it_is_too_old() -> None:
    chunks = chunks_of(payload_of(3000))
    reassembler: Reassembler[int] = Reassembler(max_age_s=10.0)
    feed(reassembler, chunks[:2])
    started = time.monotonic()

    early = reassembler.expire(now=started + 5)
    late = reassembler.expire(now=started + 11)

    assert early == []
    assert late == [("", chunks[0].message_id, [0, 1], "incomplete after 10 s")]
    assert reassembler.pending_bytes == 0


def test_a_set_restored_with_its_start_time_expires_by_its_original_age() -> None:
    chunks = chunks_of(payload_of(3000))
    reassembler: Reassembler[int] = Reassembler(max_age_s=10.0)
    now = time.monotonic()

    reassembler.add(chunks[0], 0, started=now - 9)

    assert reassembler.expire(now=now) == []
    assert reassembler.expire(now=now + 2) == [
        ("", chunks[0].message_id, [0], "incomplete after 10 s")
    ]


def test_expire_keeps_complete_and_fresh_sets_alone() -> None:
    chunks = chunks_of(payload_of(3000))
    reassembler: Reassembler[int] = Reassembler()
    feed(reassembler, chunks[:1])

    assert reassembler.expire() == []
    assert reassembler.pending_bytes == 1024


# ------------------------------------------------------------------ envelope validation


def test_a_hand_made_envelope_decodes_to_its_fields() -> None:
    chunk = decode_chunk(envelope())

    assert chunk == Chunk("m1", 0, 2, 8, SHA, b"abcd")


@pytest.mark.parametrize(
    "changes",
    [
        {"index": 2},
        {"index": -1},
        {"count": 0, "index": 0},
        {"count": MAX_CHUNK_COUNT + 1},
        {"index": True},
        {"count": 2.0},
        {"total_size": "8"},
        {"message_id": 1},
        {"data": "abcd"},
        {"sha256": SHA.hex()},
        {"sha256": SHA[:31]},
        {"data": b""},
        {"data": b"abcdefghi"},
        {"type": "update"},
    ],
)
def test_an_invalid_envelope_is_a_chunk_error(changes: dict[str, Any]) -> None:
    with pytest.raises(ChunkError) as caught:
        decode_chunk(envelope(**changes))

    assert caught.value.reason == "bad_chunk"


@pytest.mark.parametrize(
    "field", ["message_id", "index", "count", "total_size", "sha256", "data", "type"]
)
def test_an_envelope_missing_a_field_is_a_chunk_error(field: str) -> None:
    body = msgpack.unpackb(envelope())
    del body[field]

    with pytest.raises(ChunkError):
        decode_chunk(msgpack.packb(body, use_bin_type=True))


@pytest.mark.parametrize("payload", [b"", b"\xc1", msgpack.packb([1, 2]), envelope()[:-2]])
def test_bytes_that_are_not_an_envelope_map_are_a_chunk_error(payload: bytes) -> None:
    with pytest.raises(ChunkError):
        decode_chunk(payload)


def test_is_chunk_recognises_only_envelopes_written_with_protocol_and_type_first() -> None:
    reordered = msgpack.packb(
        {"type": "chunk", "protocol": 1, **msgpack.unpackb(envelope())}, use_bin_type=True
    )

    assert is_chunk(envelope())
    assert not is_chunk(reordered)
    assert not is_chunk(b"")


# ------------------------------------------------------------------ fuzzing

VALID_ENVELOPES = split_payload(payload_of(2100), 1024)


def decode_or_chunk_error(payload: bytes) -> None:
    try:
        chunk = decode_chunk(payload)
    except ChunkError as e:
        assert e.reason == "bad_chunk"
        return
    assert 0 <= chunk.index < chunk.count


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=256))
def test_random_bytes_given_to_decode_chunk_raise_only_chunk_errors(payload: bytes) -> None:
    decode_or_chunk_error(payload)


@settings(max_examples=300, deadline=None)
@given(
    envelope_index=st.integers(0, len(VALID_ENVELOPES) - 1),
    edits=st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 200),
)
def test_mutated_envelopes_raise_only_chunk_errors(
    envelope_index: int, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(VALID_ENVELOPES[envelope_index])
    for position, value in edits:
        data[position] = value
    if cut is not None:
        del data[cut:]

    decode_or_chunk_error(bytes(data))


# ------------------------------------------------------------------ senders and idle sets


def first_chunks(sets: int, size: int = 3000) -> list[Chunk]:
    """The first envelope of each of `sets` new sets of `size` bytes."""
    return [chunks_of(payload_of(size))[0] for _ in range(sets)]


def refusal(reassembler: Reassembler[int], chunk: Chunk, sender: str) -> str:
    with pytest.raises(ChunkSetError) as caught:
        reassembler.add(chunk, 0, sender=sender)
    return caught.value.reason


def test_a_sender_past_its_own_set_bound_is_refused_and_others_are_not() -> None:
    reassembler: Reassembler[int] = Reassembler(max_sets=8, max_sets_per_sender=2)
    attack = first_chunks(3)
    honest = chunks_of(payload_of(3000))
    for chunk in attack[:2]:
        reassembler.add(chunk, 0, sender="mallory")

    refused = refusal(reassembler, attack[2], "mallory")
    results = [reassembler.add(chunk, i, sender="alice") for i, chunk in enumerate(honest)]

    assert refused == "chunk_limit"
    assert results[-1] is not None and results[-1][0] == payload_of(3000)


def test_one_sender_cannot_take_the_bytes_all_senders_share() -> None:
    reassembler: Reassembler[int] = Reassembler(
        max_pending_bytes=4 * 3000, max_bytes_per_sender=2 * 3000
    )
    attack = first_chunks(3)
    for chunk in attack[:2]:
        reassembler.add(chunk, 0, sender="mallory")

    refused = refusal(reassembler, attack[2], "mallory")
    reassembler.add(first_chunks(1)[0], 0, sender="alice")

    assert refused == "chunk_limit"
    assert reassembler.pending_sets == 3


def test_a_set_that_gets_no_envelope_for_the_idle_time_expires_before_its_max_age() -> None:
    chunks = chunks_of(payload_of(3000))
    reassembler: Reassembler[int] = Reassembler(max_age_s=600.0, idle_s=30.0)
    feed(reassembler, chunks[:1])
    now = time.monotonic()

    assert reassembler.expire(now=now + 20) == []
    assert reassembler.expire(now=now + 31) == [
        ("", chunks[0].message_id, [0], "no envelope of the set for 30 s")
    ]


def test_a_set_whose_envelopes_keep_coming_is_not_idle() -> None:
    chunks = chunks_of(payload_of(3000))
    reassembler: Reassembler[int] = Reassembler(max_age_s=600.0, idle_s=30.0)
    feed(reassembler, chunks[:1])
    time.sleep(0.05)
    reassembler.add(chunks[1], 1)
    fed_last = time.monotonic()

    assert reassembler.expire(now=fed_last + 29.99) == []


def test_an_expired_set_frees_its_senders_quota() -> None:
    reassembler: Reassembler[int] = Reassembler(max_sets_per_sender=1, idle_s=30.0)
    first, second = first_chunks(2)
    reassembler.add(first, 0, sender="bob")
    [(sender, _, _, _)] = reassembler.expire(now=time.monotonic() + 31)

    assert sender == "bob"
    assert reassembler.add(second, 1, sender="bob") is None
    assert reassembler.pending_sets == 1


def test_with_a_loader_no_chunk_data_is_kept_and_the_set_is_read_back_at_the_end() -> None:
    chunks = chunks_of(payload_of(3000))
    reassembler: Reassembler[int] = Reassembler()
    reassembler.load = lambda key: chunks[key].data
    feed(reassembler, chunks[:2])
    held = [v for p in reassembler._partials.values() for v in p.parts.values()]

    done = reassembler.add(chunks[2], 2)

    assert held == [0, 1]
    assert done is not None and done[0] == payload_of(3000)


def test_an_envelope_from_another_sender_never_joins_a_set_with_the_same_message_id() -> None:
    honest = chunks_of(payload_of(3000))
    forged = Chunk(**{**honest[1].__dict__, "data": b"\x00" * len(honest[1].data)})
    reassembler: Reassembler[str] = Reassembler()
    reassembler.add(honest[0], "alice-0", sender="alice")

    joined = reassembler.add(forged, "mallory-1", sender="mallory")
    held_by_alice = reassembler.holds(forged, "alice")
    done = [reassembler.add(honest[i], f"alice-{i}", sender="alice") for i in (1, 2)]

    assert joined is None
    assert held_by_alice is False
    assert done[-1] == (payload_of(3000), ["alice-0", "alice-1", "alice-2"])
    assert reassembler.pending_sets == 1  # mallory's own set, which expires as incomplete


def test_a_set_refused_for_one_sender_is_not_refused_for_another() -> None:
    honest = chunks_of(payload_of(3000))
    reassembler: Reassembler[int] = Reassembler(max_sets_per_sender=1)
    reassembler.add(first_chunks(1)[0], 0, sender="mallory")
    refused = refusal(reassembler, honest[0], "mallory")

    done = [reassembler.add(chunk, i, sender="alice") for i, chunk in enumerate(honest)]

    assert refused == "chunk_limit"
    assert done[-1] is not None and done[-1][0] == payload_of(3000)
