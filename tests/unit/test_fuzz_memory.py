"""Fuzzing the decoder and the reassembly for memory: hostile input never makes memory grow."""

from __future__ import annotations

import contextlib
import tracemalloc

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.chunks import Reassembler, decode_chunk, split_payload
from shared.errors import ChunkError, ProtocolError
from shared.messages import decode_message

LIMIT = 64 * 1024


def _claims_of_huge_lengths() -> list[bytes]:
    """Headers that announce gigabytes and then stop: a decoder must not allocate for them."""
    return [
        b"\xc6\xff\xff\xff\xf0" + b"x" * 10,  # bin32 of ~4 GiB
        b"\xdb\xff\xff\xff\xf0" + b"x" * 10,  # str32 of ~4 GiB
        b"\xdd\xff\xff\xff\xf0" + b"\x01" * 10,  # array32 of ~4 G items
        b"\xdf\xff\xff\xff\xf0" + b"\x01" * 10,  # map32 of ~4 G pairs
        msgpack.packb({"protocol": 1, "type": "update"})[:-1] + b"\xc6\x7f\xff\xff\xff",
    ]


def test_a_message_announcing_gigabytes_is_refused_without_allocating_them() -> None:
    tracemalloc.start()
    try:
        for payload in _claims_of_huge_lengths():
            with contextlib.suppress(ProtocolError):
                decode_message(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 10 * 1024 * 1024


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(1, 50), st.integers(2_000, 20_000), st.booleans()),
        min_size=1,
        max_size=30,
    )
)
def test_incomplete_chunk_sets_never_hold_more_than_the_bound_after_expiry(
    sets: list[tuple[int, int, bool]],
) -> None:
    reassembler: Reassembler[int] = Reassembler(max_pending_bytes=LIMIT, max_age_s=3600)
    key = 0
    for seed, size, withhold_last in sets:
        chunks = split_payload(bytes([seed % 256]) * size, 1024)
        for body in chunks[:-1] if withhold_last else chunks:
            key += 1
            with contextlib.suppress(ChunkError):
                reassembler.add(decode_chunk(body), key)
        reassembler.expire()

        assert reassembler.pending_bytes <= LIMIT
