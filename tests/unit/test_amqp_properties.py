"""Content headers pika cannot decode: the frame is still read, its properties marked as such.

Frame bytes in, a frame out: the connection's reader must consume a header frame whose
properties pika fails on (a timestamp past year 9999, a table nested too deep for Python's stack)
instead of raising, which would drop the connection and have the broker redeliver the message
to the same failure for ever.
"""

from __future__ import annotations

import pika.exceptions
import pika.frame
import pytest
from hostile_properties import ODD, POISON, header_frame, properties, table

from broker.rabbitmq import UndecodableProperties, decode_frame_tolerantly

pytestmark = pytest.mark.timeout(30)

NEXT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"  # a heartbeat that follows in the buffer


@pytest.mark.parametrize("name", sorted(POISON))
def test_a_header_frame_pika_cannot_decode_is_consumed_and_marked_undecodable(name: str) -> None:
    frame = header_frame(properties(POISON[name], user_id="site-x"), body_size=7)

    with pytest.raises((ArithmeticError, ValueError, RecursionError)):
        pika.frame.decode_frame(frame)  # what pika alone does with it
    consumed, decoded = decode_frame_tolerantly(frame + NEXT_FRAME)

    assert consumed == len(frame)
    assert isinstance(decoded, pika.frame.Header) and decoded.body_size == 7
    marked = decoded.properties
    assert isinstance(marked, UndecodableProperties)
    assert marked.decode_error.split(":")[0] in ("OverflowError", "ValueError", "RecursionError")
    # Only the headers table is lost: the fields after it still say who published it.
    assert marked.headers is None
    assert marked.user_id == "site-x" and marked.delivery_mode == 2


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_properties_pika_can_decode_come_out_as_pika_decodes_them(name: str) -> None:
    frame = header_frame(properties(**ODD[name]), body_size=3)

    consumed, decoded = decode_frame_tolerantly(frame)
    expected = pika.frame.decode_frame(frame)[1]

    assert consumed == len(frame)
    assert isinstance(decoded, pika.frame.Header)
    assert not isinstance(decoded.properties, UndecodableProperties)
    assert isinstance(expected, pika.frame.Header)
    assert vars(decoded.properties) == vars(expected.properties)


def test_a_poisoned_table_after_a_content_type_still_keeps_the_fields_around_it() -> None:
    encoded = properties(POISON["timestamp_2_pow_63"], content_type=b"x/y", message_id=b"m-1")

    _, decoded = decode_frame_tolerantly(header_frame(encoded, body_size=0))

    assert isinstance(decoded, pika.frame.Header)
    marked = decoded.properties
    assert isinstance(marked, UndecodableProperties)
    assert (marked.content_type, marked.message_id, marked.headers) == ("x/y", "m-1", None)


def test_a_table_whose_length_runs_past_the_frame_leaves_every_field_unset() -> None:
    broken = properties(table((b"t", b"T" + b"\xff" * 8)))
    # The table claims more bytes than the frame holds: nothing after it can be trusted.
    broken = broken[:2] + b"\x7f\xff\xff\xff" + broken[6:]

    _, decoded = decode_frame_tolerantly(header_frame(broken, body_size=0))

    assert isinstance(decoded, pika.frame.Header)
    marked = decoded.properties
    assert isinstance(marked, UndecodableProperties)
    assert (marked.headers, marked.user_id, marked.delivery_mode) == (None, None, None)


def test_an_incomplete_frame_waits_for_more_bytes_and_a_broken_one_still_raises() -> None:
    frame = header_frame(properties(POISON["timestamp_2_pow_63"]), body_size=0)

    assert decode_frame_tolerantly(frame[:-1]) == (0, None)
    with pytest.raises(pika.exceptions.InvalidFrameError):
        decode_frame_tolerantly(frame[:-1] + b"\x00")


def test_other_frames_are_pikas_own() -> None:
    consumed, decoded = decode_frame_tolerantly(NEXT_FRAME)

    assert consumed == len(NEXT_FRAME) and isinstance(decoded, pika.frame.Heartbeat)
