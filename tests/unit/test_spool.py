"""The chunk spool: envelopes written durably, read back in order, dropped per set."""

from __future__ import annotations

import decimal
from pathlib import Path

from broker.spool import ChunkSpool


def test_a_saved_envelope_reads_back_with_its_queue_headers_and_user(tmp_path: Path) -> None:
    spool = ChunkSpool(tmp_path / "chunks")

    path = spool.save("m1", 3, b"envelope", "fedq.updates", {"k": "v"}, "site-a")
    envelope = spool.read(path)

    assert (envelope.message_id, envelope.index, envelope.body) == ("m1", 3, b"envelope")
    assert (envelope.queue, envelope.headers, envelope.user_id) == (
        "fedq.updates",
        {"k": "v"},
        "site-a",
    )


def test_a_message_id_never_names_a_path_outside_the_spool(tmp_path: Path) -> None:
    spool = ChunkSpool(tmp_path / "chunks")

    path = spool.save("../../escape", 0, b"x", "q", {}, None)

    assert path.resolve().is_relative_to((tmp_path / "chunks").resolve())
    assert not (tmp_path / "escape").exists()


def test_load_returns_every_set_oldest_first_and_drop_forgets_one_set(tmp_path: Path) -> None:
    spool = ChunkSpool(tmp_path / "chunks")
    spool.save("a", 0, b"a0", "q", {}, None)
    spool.save("b", 0, b"b0", "q", {}, None)
    spool.save("a", 1, b"a1", "q", {}, None)

    spool.drop("b")
    loaded = [(e.message_id, e.index) for _, e in spool.load()]

    assert sorted(loaded) == [("a", 0), ("a", 1)]


def test_an_unreadable_spool_file_is_removed_on_load_not_raised(tmp_path: Path) -> None:
    spool = ChunkSpool(tmp_path / "chunks")
    good = spool.save("a", 0, b"a0", "q", {}, None)
    torn = good.parent / "1.chunk"
    torn.write_bytes(b"\x93\x01")  # a msgpack array cut short

    loaded = spool.load()

    assert [e.index for _, e in loaded] == [0]
    assert not torn.exists()


def test_header_values_msgpack_cannot_hold_are_kept_as_text(tmp_path: Path) -> None:
    spool = ChunkSpool(tmp_path / "chunks")

    path = spool.save("a", 0, b"x", "q", {"d": decimal.Decimal("1.5"), "big": 1 << 70}, None)

    assert spool.read(path).headers == {"d": "1.5", "big": str(1 << 70)}
