"""Finite values that would overflow the model never make a version that is not finite: a FedBuff
delta that would take the model out of its dtype's range is rejected as out_of_range, and a
candidate version that is not finite anyway is discarded, never published."""

from __future__ import annotations

import itertools

import numpy as np

from aggregator.state import Accepted, Discarded, JobState, Rejected
from shared.jobs import JobSpec, StrategyConfig
from shared.messages import MAX_NUM_SAMPLES, Job, Update

_ids = itertools.count()
BIG = 3e38  # finite in float32 (largest 3.4e38); twice it is not
KEY = bytes(range(32))  # one task key for every state, so a restored one knows the tasks


def _state(dtype: type = np.float32, **strategy: object) -> JobState:
    spec = JobSpec(strategy=StrategyConfig(**strategy))  # type: ignore[arg-type]
    initial = {"w": np.zeros(3, dtype), "steps": np.array(0, np.int64)}
    job = Job("job1", spec)
    return JobState(job, initial, started_at=0.0, worker_timeout_s=60, task_key=KEY)


def _update(
    state: JobState, w: list[float], worker: str = "a", kind: str = "delta", n: int = 10
) -> Update:
    return Update(
        job_id="job1",
        update_id=f"u{next(_ids)}",
        worker_id=worker,
        task_id=state.tasks.issue(worker, state.version),
        base_version=state.version,
        round=None,
        kind=kind,
        num_samples=n,
        tensors={"w": np.array(w, state.model["w"].dtype), "steps": np.array(1, np.int64)},
    )


def _offer(state: JobState, *updates: Update) -> list[object]:
    return [state.offer(u, now=1.0) for u in updates]


def test_fedbuff_deltas_near_the_float32_limit_make_a_finite_version() -> None:
    state = _state(name="fedbuff", buffer_size=2)

    outcomes = _offer(
        state,
        _update(state, [BIG, BIG, 1.0], n=MAX_NUM_SAMPLES),
        _update(state, [BIG, -BIG, 1.0], n=MAX_NUM_SAMPLES),
    )

    assert all(isinstance(o, Accepted) for o in outcomes)
    assert state.version == 1
    np.testing.assert_allclose(state.model["w"], [BIG, 0.0, 1.0], rtol=1e-6)


def test_a_delta_that_would_take_the_model_out_of_float32_range_is_rejected_as_out_of_range() -> (
    None
):
    state = _state(name="fedbuff", buffer_size=1)
    _offer(state, _update(state, [BIG, 0.0, 0.0]))  # the model is at 3e38 now
    model = state.model["w"].copy()

    outcome = state.offer(_update(state, [BIG, 0.0, 0.0], worker="h"), now=2.0)

    assert isinstance(outcome, Rejected) and outcome.reason == "out_of_range"
    assert "'w'" in outcome.detail
    assert state.rejected == {"out_of_range": 1}
    np.testing.assert_array_equal(state.model["w"], model)


def test_the_range_counts_the_server_learning_rate() -> None:
    state = _state(name="fedbuff", buffer_size=1, server_lr=2.0)

    inside = state.offer(_update(state, [1e38, -1e38, 0.0]), now=1.0)
    outside = state.offer(_update(state, [-2e38, 0.0, 0.0]), now=1.0)  # 2e38 - 4e38 = -2e38: in
    beyond = state.offer(_update(state, [-2e38, 0.0, 0.0]), now=1.0)  # -2e38 - 4e38: out

    assert isinstance(inside, Accepted) and isinstance(outside, Accepted)
    assert isinstance(beyond, Rejected) and beyond.reason == "out_of_range"


def test_after_a_hostile_near_limit_update_honest_updates_are_accepted_and_versions_advance() -> (
    None
):
    # The issue's case: the weighted float32 sum overflowed, the global model became NaN, and
    # every honest update after it was rejected as not_finite for the rest of the job.
    state = _state(name="fedbuff", buffer_size=2)
    first = _offer(state, _update(state, [BIG, BIG, BIG], worker="h"), _update(state, [0.1] * 3))
    again = state.offer(_update(state, [BIG, BIG, BIG], worker="h"), now=1.0)

    honest = _offer(state, *[_update(state, [-0.1, 0.0, 0.1], worker=w) for w in "abcde"])

    assert all(isinstance(o, Accepted) for o in first)
    assert isinstance(again, Rejected) and again.reason == "out_of_range"
    assert all(isinstance(o, Accepted) for o in honest)
    assert state.version == 1 + 5 // 2
    assert np.isfinite(state.model["w"]).all()


def test_a_candidate_version_that_is_not_finite_is_discarded_and_the_job_goes_on() -> None:
    # float64 models are summed in float64: 1e9 samples x 1e308 overflows it. The last line of
    # defence: that version is never published, and the buffer that made it is let go.
    state = _state(np.float64, name="fedbuff", buffer_size=2)
    poisoned = [_update(state, [1e308, 0.0, 0.0], n=MAX_NUM_SAMPLES, worker=w) for w in "hi"]

    outcomes = _offer(state, *poisoned)

    assert all(isinstance(o, Accepted) and o.new_version is None for o in outcomes)
    assert state.version == 0 and state.pending_update_ids == []
    np.testing.assert_array_equal(state.model["w"], [0.0, 0.0, 0.0])
    (discarded,) = state.take_discarded()
    assert discarded == Discarded(
        tuple(u.update_id for u in poisoned), "version_not_finite", discarded.detail
    )
    assert "'w'" in discarded.detail and state.take_discarded() == []

    honest = [_update(state, [1.0, 1.0, 1.0]), _update(state, [3.0, 3.0, 3.0])]
    outcomes = _offer(state, *honest)

    assert isinstance(outcomes[1], Accepted) and outcomes[1].new_version == 1
    np.testing.assert_allclose(state.model["w"], [2.0, 2.0, 2.0])
    assert state.last_record is not None
    assert state.last_record.update_ids == [u.update_id for u in honest]


def test_a_fedavg_round_whose_mean_is_not_finite_is_discarded_and_run_again() -> None:
    state = _state(np.float64, name="fedavg", round_deadline_s=10.0)
    for worker in "ab":
        state.note_worker(worker, 0.0)
        state.note_task(worker, f"task-{worker}", 0.0)
    big = [_update(state, [1e308, 1e308, 0.0], w, "weights", MAX_NUM_SAMPLES) for w in "ab"]

    _offer(state, *big)

    assert state.version == 0 and state.round == 0
    assert [d.update_ids for d in state.take_discarded()] == [tuple(u.update_id for u in big)]
    assert sorted(state.workers_to_task(2.0)) == ["a", "b"], "the round is run again"
    for worker in "ab":
        state.note_task(worker, f"again-{worker}", 2.0)
    honest = _offer(state, *[_update(state, [1.0, 2.0, 3.0], w, "weights") for w in "ab"])
    assert isinstance(honest[1], Accepted) and honest[1].new_version == 1
    assert state.round == 1


def test_a_buffer_widened_by_near_limit_deltas_is_checkpointed_and_restored_in_float64() -> None:
    state = _state(name="fedbuff", buffer_size=3)
    _offer(state, *[_update(state, [BIG, -BIG, 0.5], w, n=MAX_NUM_SAMPLES) for w in "ab"])
    assert state._buffer.widened == ["w"]

    restored = _state(name="fedbuff", buffer_size=3)
    restored.restore(state.snapshot(now=1.0), now=1.0)
    last = _update(state, [0.0, 0.0, 1.0], "c", n=MAX_NUM_SAMPLES)
    for s in (state, restored):
        s.offer(last, now=2.0)

    assert restored.version == state.version == 1
    np.testing.assert_array_equal(restored.model["w"], state.model["w"])
    np.testing.assert_allclose(state.model["w"], [2 * BIG / 3, -2 * BIG / 3, 2 / 3], rtol=1e-6)


def test_ordinary_updates_are_summed_in_float32_and_a_restored_buffer_keeps_its_bits() -> None:
    state = _state(name="fedbuff", buffer_size=3)
    rng = np.random.default_rng(3)
    deltas = [rng.normal(size=3).astype(np.float32).tolist() for _ in range(3)]
    _offer(state, _update(state, deltas[0], "a", n=10), _update(state, deltas[1], "b", n=11))

    restored = _state(name="fedbuff", buffer_size=3)
    restored.restore(state.snapshot(now=1.0), now=1.0)
    last = _update(state, deltas[2], "c", n=12)
    for s in (state, restored):
        s.offer(last, now=2.0)

    assert state._buffer.sums["w"].dtype == np.float32
    total = np.zeros(3, np.float32)
    for i, d in enumerate(deltas):
        total += np.array(d, np.float32) * np.float32(10 + i)
    expected = np.float32(0.0) + np.float32(1.0 / (10 + 11 + 12)) * total
    np.testing.assert_array_equal(state.model["w"], expected)
    np.testing.assert_array_equal(restored.model["w"], expected)
