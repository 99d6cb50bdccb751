"""Checkpoints: whole or not at all, verified, never unpickled; the previous one when corrupt."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from known_task_key import KEY, task_id

from aggregator.checkpoint import (
    KEEP,
    MAGIC,
    SEEN_LOG,
    USED_LOG,
    CheckpointError,
    CheckpointStore,
    decode_checkpoint,
    encode_checkpoint,
)
from aggregator.service import JobFigures
from aggregator.state import JobState, Rejected
from shared.jobs import JobSpec, StrategyConfig
from shared.messages import Job, Update


def _state(version_updates: int = 0) -> JobState:
    spec = JobSpec(strategy=StrategyConfig(name="fedbuff", buffer_size=2))
    initial = {"w": np.zeros(3, np.float32), "steps": np.array(0, np.int64)}
    state = JobState(Job("job1", spec), initial, 0.0, worker_timeout_s=60, task_key=KEY)
    for i in range(version_updates):
        update = Update(
            "job1", f"u{i}", "a", task_id("job1", "a", state.version), state.version, None,
            "delta", 10,
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
    last = Update("job1", "u9", "b", task_id("job1", "b", 1), 1, None, "delta", 10,
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
    last = Update("job1", "u9", "b", task_id("job1", "b", 1), 1, None, "delta", 10,
                  {"w": np.full(3, 7, np.float32), "steps": np.array(9, np.int64)})  # fmt: skip
    at_version.offer(last, now=1.0)
    restored.offer(last, now=1.0)
    another = replace(last, update_id="u10", task_id=task_id("job1", "b", 1))
    at_version.offer(another, now=1.0)
    restored.offer(another, now=1.0)
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

    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 4 and names[0].endswith(".ckpt") and names[1].endswith(".ckpt")
    assert names[2:] == [SEEN_LOG, USED_LOG]


def test_a_new_store_continues_the_sequence_so_the_newest_stays_newest(tmp_path: Path) -> None:
    CheckpointStore(tmp_path).save("job1", _state(4).snapshot(0), {"n": "first"})

    CheckpointStore(tmp_path).save("job1", _state(2).snapshot(0), {"n": "second"})

    assert CheckpointStore(tmp_path).load_latest()[1] == {"n": "second"}  # type: ignore[index]


def test_no_checkpoint_at_all_loads_as_none(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "empty").load_latest() is None


def _ids_state(count: int) -> JobState:
    """A FedBuff state that has seen `count` updates (all folded, a version every two)."""
    state = _state()
    for i in range(count):
        state.offer(_small_update(f"id-{i:06d}", state.version), now=float(i))
    return state


def _small_update(update_id: str, base: int) -> Update:
    tensors = {"w": np.full(3, 0.001, np.float32), "steps": np.array(0, np.int64)}
    return Update(
        "job1", update_id, "a", task_id("job1", "a", base), base, None, "delta", 10, tensors
    )


def test_a_checkpoint_logs_only_the_ids_seen_since_the_one_before(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    state = _ids_state(2000)
    first = store.save("job1", state.snapshot(0), {})
    log_after_first = (tmp_path / SEEN_LOG).stat().st_size
    state.offer(_small_update("one-more", state.version), now=1.0)

    second = store.save("job1", state.snapshot(0), {})

    grown = (tmp_path / SEEN_LOG).stat().st_size - log_after_first
    assert 0 < grown < 100  # one record holding one id, not 2,001 ids again
    assert second.stat().st_size < first.stat().st_size + 1000  # the file does not hold the ids
    restored = _state()
    restored.restore(CheckpointStore(tmp_path).load_latest()[0], now=0.0)  # type: ignore[index]
    assert restored.seen_update_ids == state.seen_update_ids and len(state.seen_update_ids) == 2001


def test_ids_logged_by_a_checkpoint_that_never_completed_are_cut_off_on_load(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    store.save("job1", _ids_state(4).snapshot(0), {})
    with open(tmp_path / SEEN_LOG, "ab") as fh:  # a crash after logging, before the checkpoint
        fh.write(b"\x00\x00\x00\x10" + b"x" * 20)

    reopened = CheckpointStore(tmp_path)
    snap, _ = reopened.load_latest()  # type: ignore[misc]
    state = _state()
    state.restore(snap, now=0.0)
    state.offer(_small_update("late", state.version), now=1.0)
    reopened.save("job1", state.snapshot(0), {})

    final, _ = CheckpointStore(tmp_path).load_latest()  # type: ignore[misc]
    assert final["seen_update_ids"] == ["id-000000", "id-000001", "id-000002", "id-000003", "late"]


def test_a_damaged_id_log_falls_back_to_the_checkpoint_whose_ids_are_intact(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    store.save("job1", _ids_state(2).snapshot(0), {"n": 1})
    store.save("job1", _ids_state(4).snapshot(0), {"n": 2})
    log = tmp_path / SEEN_LOG
    data = bytearray(log.read_bytes())
    data[-1] ^= 0xFF  # the second record, logged for the newer checkpoint, is damaged
    log.write_bytes(bytes(data))

    snap, figures = CheckpointStore(tmp_path).load_latest()  # type: ignore[misc]

    assert figures == {"n": 1} and snap["seen_update_ids"] == ["id-000000", "id-000001"]
    assert KEEP == 2


def test_a_checkpoint_from_before_the_id_log_loads_and_the_next_one_logs_every_id(
    tmp_path: Path,
) -> None:
    state = _ids_state(3)
    old = encode_checkpoint("job1", dict(state.snapshot(0)), {"n": "old"})  # ids inside it
    (tmp_path / "checkpoint-00000001-00000001.ckpt").write_bytes(old)

    store = CheckpointStore(tmp_path)
    snap, _ = store.load_latest()  # type: ignore[misc]
    store.save("job1", snap, {"n": "new"})

    final, figures = CheckpointStore(tmp_path).load_latest()  # type: ignore[misc]
    assert figures == {"n": "new"}
    assert final["seen_update_ids"] == ["id-000000", "id-000001", "id-000002"]


def test_the_tasks_accepted_updates_answered_survive_a_restart_so_a_replay_stays_refused(
    tmp_path: Path,
) -> None:
    state = _state()
    for k in range(3):  # two make version 1, the third waits in the buffer
        state.offer(_small_update(f"u{k}", state.version), now=1.0)
    CheckpointStore(tmp_path).save("job1", state.snapshot(0), {})
    replay = replace(_small_update("replayed", 1), task_id=state._used_order[-1])

    restored = _state()
    restored.restore(CheckpointStore(tmp_path).load_latest()[0], now=0.0)  # type: ignore[index]
    outcome = restored.offer(replay, now=2.0)

    assert restored.used_tasks == state.used_tasks and len(state.used_tasks) == 3
    assert (tmp_path / USED_LOG).exists()
    assert isinstance(outcome, Rejected) and outcome.reason == "task_used"


def test_a_checkpoint_from_before_task_ids_were_checked_restores_with_no_task_used(
    tmp_path: Path,
) -> None:
    snap = dict(_ids_state(3).snapshot(0))
    del snap["used_tasks"]
    (tmp_path / "checkpoint-00000001-00000001.ckpt").write_bytes(
        encode_checkpoint("job1", snap, {})
    )

    loaded, _ = CheckpointStore(tmp_path).load_latest()  # type: ignore[misc]
    restored = _state()
    restored.restore(loaded, now=0.0)

    assert restored.used_tasks == set()
    assert restored.seen_update_ids == {"id-000000", "id-000001", "id-000002"}


# The service's figures, as checkpoints have kept them (before best_version, last_evaluated and
# updates_discarded were added, and since), with the history lines that wait for a score.
_OLD_FIGURES = {
    "best_accuracy": 0.5,
    "last_accuracy": 0.25,
    "last_loss": 1.5,
    "time_to_target_s": None,
    "bytes_received": 100,
    "bytes_sent": 200,
    "unwritten_history": [],
}
_FIGURES = _OLD_FIGURES | {"best_version": 3, "last_evaluated": 4, "updates_discarded": 2}


def test_the_job_figures_are_checkpointed_under_the_names_checkpoints_have_always_used() -> None:
    figures = JobFigures.from_dict(_FIGURES)

    assert figures.to_dict() | {"unwritten_history": []} == _FIGURES


def test_the_figures_of_a_checkpoint_written_before_later_figures_take_their_defaults() -> None:
    figures = JobFigures.from_dict(_OLD_FIGURES)

    assert figures == JobFigures(
        best_accuracy=0.5, last_accuracy=0.25, last_loss=1.5, bytes_received=100, bytes_sent=200
    )
    assert (figures.best_version, figures.last_evaluated, figures.updates_discarded) == (
        None,
        None,
        0,
    )


def test_the_job_figures_survive_a_checkpoint_file() -> None:
    figures = JobFigures(best_accuracy=0.75, best_version=2, bytes_sent=9, updates_discarded=1)

    _, _, kept = decode_checkpoint(
        encode_checkpoint("job1", _state().snapshot(1.0), figures.to_dict())
    )

    assert JobFigures.from_dict(kept) == figures
