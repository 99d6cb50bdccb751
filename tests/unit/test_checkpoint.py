"""Checkpoints: whole or not at all, verified, never unpickled; the previous one when corrupt."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from aggregator.checkpoint import (
    MAGIC,
    CheckpointError,
    CheckpointStore,
    decode_checkpoint,
    encode_checkpoint,
)
from aggregator.state import JobState
from shared.jobs import JobSpec, StrategyConfig
from shared.messages import Job, Update


def _state(version_updates: int = 0) -> JobState:
    spec = JobSpec(strategy=StrategyConfig(name="fedbuff", buffer_size=2))
    initial = {"w": np.zeros(3, np.float32), "steps": np.array(0, np.int64)}
    state = JobState(Job("job1", spec), initial, started_at=0.0, worker_timeout_s=60)
    for i in range(version_updates):
        update = Update(
            "job1", f"u{i}", "a", "t", state.version, None, "delta", 10,
            {"w": np.full(3, i + 1, np.float32), "steps": np.array(i, np.int64)},
            {"loss": 0.5},
        )  # fmt: skip
        state.offer(update, now=float(i))
    return state


def test_a_checkpoint_round_trip_restores_model_buffer_and_seen_ids_exactly() -> None:
    state = _state(version_updates=3)  # one version from u0, u1; u2 waits in the buffer
    data = encode_checkpoint("job1", state.snapshot(now=10.0), {"best_accuracy": 0.5})

    job_id, snap, figures = decode_checkpoint(data)
    restored = _state()
    restored.restore(snap, now=100.0)

    assert job_id == "job1" and figures == {"best_accuracy": 0.5}
    assert restored.version == 1 and restored.pending_update_ids == ["u2"]
    assert restored.seen_update_ids == {"u0", "u1", "u2"}
    np.testing.assert_array_equal(restored.model["w"], state.model["w"])
    assert restored.started_at == pytest.approx(90.0)


def test_a_restored_state_folds_the_next_update_into_the_same_model_as_the_original() -> None:
    original = _state(version_updates=3)
    restored = _state()
    restored.restore(decode_checkpoint(encode_checkpoint("job1", original.snapshot(0), {}))[1], 0)
    last = Update("job1", "u9", "b", "t", 1, None, "delta", 10,
                  {"w": np.full(3, 7, np.float32), "steps": np.array(9, np.int64)})  # fmt: skip

    original.offer(last, now=1.0)
    restored.offer(last, now=1.0)

    assert restored.version == original.version == 2
    assert restored.model["w"].tobytes() == original.model["w"].tobytes()


def test_a_checkpoint_at_a_version_leaves_the_empty_buffer_out_and_restores_it_empty() -> None:
    at_version = _state(version_updates=2)  # u0, u1 made version 1; the buffer is empty again
    with_buffer = _state(version_updates=3)

    _, snap, _ = decode_checkpoint(encode_checkpoint("job1", at_version.snapshot(0), {}))
    restored = _state(version_updates=1)  # a buffer holding u0, which the restore must drop
    restored.restore(snap, now=0.0)

    assert "buffer" not in snap and "buffer" in with_buffer.snapshot(0)
    assert len(encode_checkpoint("job1", at_version.snapshot(0), {})) < len(
        encode_checkpoint("job1", with_buffer.snapshot(0), {})
    )
    assert restored.pending_update_ids == []
    last = Update("job1", "u9", "b", "t", 1, None, "delta", 10,
                  {"w": np.full(3, 7, np.float32), "steps": np.array(9, np.int64)})  # fmt: skip
    at_version.offer(last, now=1.0)
    restored.offer(last, now=1.0)
    at_version.offer(replace(last, update_id="u10"), now=1.0)
    restored.offer(replace(last, update_id="u10"), now=1.0)
    assert restored.version == at_version.version == 2
    assert restored.model["w"].tobytes() == at_version.model["w"].tobytes()


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # one bit flipped
        lambda b: b"NOTFEDQ!" + b[8:],  # another file
        lambda b: b"",
    ],
)
def test_a_damaged_checkpoint_is_refused(damage: object) -> None:
    data = encode_checkpoint("job1", _state(2).snapshot(0), {})

    with pytest.raises(CheckpointError):
        decode_checkpoint(damage(data))  # type: ignore[operator]


def test_a_checkpoint_body_is_msgpack_behind_magic_and_sha256_never_pickle() -> None:
    data = encode_checkpoint("job1", _state(2).snapshot(0), {})

    assert data.startswith(MAGIC)
    assert b"\x80\x04\x95" not in data[:64]  # no pickle protocol-4 header


def test_the_store_loads_the_newest_checkpoint_and_falls_back_when_it_is_corrupt(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    older = _state(2)
    store.save("job1", older.snapshot(0), {"n": 1})
    newer = _state(4)
    newest_path = store.save("job1", newer.snapshot(0), {"n": 2})

    assert store.load_latest()[1] == {"n": 2}  # type: ignore[index]
    newest_path.write_bytes(newest_path.read_bytes()[:100])
    state, figures = store.load_latest()  # type: ignore[misc]

    assert figures == {"n": 1} and state["version"] == 1


def test_the_store_keeps_only_the_last_two_checkpoints_and_no_temporary_files(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    for _ in range(5):
        store.save("job1", _state(2).snapshot(0), {})

    assert len(list(tmp_path.iterdir())) == 2


def test_a_new_store_continues_the_sequence_so_the_newest_stays_newest(tmp_path: Path) -> None:
    CheckpointStore(tmp_path).save("job1", _state(4).snapshot(0), {"n": "first"})

    CheckpointStore(tmp_path).save("job1", _state(2).snapshot(0), {"n": "second"})

    assert CheckpointStore(tmp_path).load_latest()[1] == {"n": "second"}  # type: ignore[index]


def test_no_checkpoint_at_all_loads_as_none(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "empty").load_latest() is None
