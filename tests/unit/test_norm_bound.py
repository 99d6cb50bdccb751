"""The norm bound: an update whose change is far larger than the workers' recent ones is rejected,
and no one worker can move what the bound takes as normal (docs/reliability.md)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from aggregator.checkpoint import decode_checkpoint, encode_checkpoint
from aggregator.state import Accepted, JobState, Rejected
from shared.errors import ConfigError
from shared.jobs import JobSpec, StrategyConfig
from shared.messages import Job, Update

_ids = itertools.count()


def _state(**strategy: object) -> JobState:
    spec = JobSpec(strategy=StrategyConfig(**strategy))  # type: ignore[arg-type]
    initial = {"w": np.zeros(4, np.float32), "steps": np.array(0, np.int64)}
    return JobState(Job("job1", spec), initial, started_at=0.0, worker_timeout_s=60)


def _update(state: JobState, scale: float, kind: str = "delta", worker: str = "a") -> Update:
    """An update whose change from the state's model is `scale` * [1, 1, 1, 1] (norm 2 * scale)."""
    base = np.zeros(4, np.float32) if kind == "delta" else state.model["w"]
    w = (base + np.float32(scale)).astype(np.float32)
    return Update(
        job_id="job1",
        update_id=f"u{next(_ids)}",
        worker_id=worker,
        task_id=state.tasks.issue(worker, state.version),
        base_version=state.version,
        round=None,
        kind=kind,
        num_samples=10,
        # A huge integer buffer: only floating-point tensors count towards the norm.
        tensors={"w": w, "steps": np.array(10**12, np.int64)},
    )


def _feed(state: JobState, *scales: float, kind: str = "delta") -> list[object]:
    """One update per scale, from workers a, b and c in turn."""
    workers = itertools.cycle("abc")
    return [state.offer(_update(state, s, kind, next(workers)), now=1.0) for s in scales]


def test_an_update_far_beyond_the_norms_of_the_workers_is_rejected_as_norm_too_large() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)
    _feed(state, 1.0, 1.2, 0.8)
    model = {name: a.copy() for name, a in state.model.items()}

    outcome = state.offer(_update(state, 100.0), now=2.0)

    assert isinstance(outcome, Rejected) and outcome.reason == "norm_too_large"
    assert "10 x 2, the median over workers" in outcome.detail
    assert state.rejected == {"norm_too_large": 1}
    assert all(np.array_equal(state.model[n], model[n]) for n in model)


def test_updates_within_the_ratio_of_the_reference_are_accepted() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)

    outcomes = _feed(state, 1.0, 1.2, 0.8, 9.0, 0.1, 1.0)

    assert all(isinstance(o, Accepted) for o in outcomes)
    assert state.accepted == 6


def test_for_weights_the_norm_is_that_of_the_difference_from_the_global_model() -> None:
    state = _state(name="fedasync", alpha=1.0, max_update_norm_ratio=3.0)
    _feed(state, 1.0, 1.0, 1.0, kind="weights")  # the model moves to 3.0 everywhere

    near = state.offer(_update(state, 1.0, "weights"), now=2.0)  # weights 4.0, change 1.0
    far = state.offer(_update(state, 5.0, "weights"), now=2.0)  # weights 9.0, change 5.0

    assert isinstance(near, Accepted)
    assert isinstance(far, Rejected) and far.reason == "norm_too_large"


def test_the_bound_is_inactive_until_three_workers_sent_updates() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=2.0)

    alone = [state.offer(_update(state, s), now=1.0) for s in (1.0, 100.0, 1e4)]
    others = [state.offer(_update(state, 1.0, worker=w), now=1.0) for w in "bc"]
    fourth = state.offer(_update(state, 1e7), now=2.0)

    assert all(isinstance(o, Accepted) for o in alone + others), "one worker is no reference"
    assert isinstance(fourth, Rejected) and fourth.reason == "norm_too_large"


def test_without_a_ratio_no_update_is_rejected_for_its_norm() -> None:
    state = _state(name="fedbuff", buffer_size=1)

    outcomes = _feed(state, 1.0, 1.0, 1.0, 1e6)

    assert all(isinstance(o, Accepted) for o in outcomes)


def test_one_worker_s_rejected_updates_do_not_move_the_reference() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=2.0)
    _feed(state, 1.0, 1.0, 1.0)

    rejected = [state.offer(_update(state, 50.0, worker="h"), now=1.0) for _ in range(4)]
    reference = state.norm_reference()
    normal = state.offer(_update(state, 1.5), now=2.0)

    assert all(isinstance(o, Rejected) for o in rejected)
    assert reference == pytest.approx(2.0), "a, b and c at 2, h at 100: the median is 2"
    assert isinstance(normal, Accepted)


def test_the_reference_follows_the_workers_latest_norms() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=2.0)
    _feed(state, *([1.0] * 30))
    _feed(state, 1.9, 1.9, 1.9)  # each within 2 x the reference before it

    outcome = state.offer(_update(state, 3.5), now=2.0)

    assert isinstance(outcome, Accepted), "the 1.0s are past; the reference is 1.9 x 2 now"


def test_the_workers_norms_survive_a_snapshot_and_restore_through_a_checkpoint() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)
    _feed(state, 1.0, 1.2, 0.8)
    _, snap, _ = decode_checkpoint(encode_checkpoint("job1", state.snapshot(5.0), {}))
    restored = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)

    restored.restore(snap, now=6.0)
    outcome = restored.offer(_update(restored, 100.0), now=7.0)

    assert snap["worker_norms"] == pytest.approx({"a": 2.0, "b": 2.4, "c": 1.6})
    assert isinstance(outcome, Rejected) and outcome.reason == "norm_too_large"


def test_a_snapshot_from_before_the_per_worker_norms_restores_with_the_bound_afresh() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)
    _feed(state, 1.0, 1.2, 0.8)
    snap = state.snapshot(5.0)
    del snap["worker_norms"]
    snap["accepted_norms"] = [2.0, 2.4, 1.6]  # what the median of recent accepted norms kept
    restored = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)

    restored.restore(snap, now=6.0)
    outcome = restored.offer(_update(restored, 100.0), now=7.0)

    assert isinstance(outcome, Accepted)
    assert restored.norm_reference() is None


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.0, -3.0, float("nan")])
def test_a_ratio_of_one_or_less_is_a_config_error(ratio: float) -> None:
    with pytest.raises(ConfigError, match="max_update_norm_ratio"):
        StrategyConfig(max_update_norm_ratio=ratio)


# ---------------------------------------------------------------- one site against the bound


def _round(state: JobState, scale: float, *workers: str) -> list[object]:
    """One update of `scale` from each worker, in turn."""
    return [state.offer(_update(state, scale, worker=w), now=1.0) for w in workers]


HONEST = ("a", "b", "c", "d")


def test_after_two_in_bound_poisoning_updates_honest_workers_are_accepted_again() -> None:
    # The issue's case: honest deltas of norm ~2; a hostile site sends two gradient-ascent
    # deltas just inside the bound (9 x the median, the ratio is 10); honest updates that then
    # undo them are 15 x the old norm. The old median of accepted norms never saw them, so
    # every later honest update was rejected, for ever.
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)
    _round(state, 1.0, *HONEST)
    _round(state, 1.0, *HONEST)
    poison = _round(state, -9.0, "h", "h")
    assert all(isinstance(o, Accepted) for o in poison)

    first, second, third = (_round(state, 15.0, *HONEST) for _ in range(3))

    # The bound cannot tell the first large updates from an attack: those of half the workers
    # are rejected, then the reference is theirs and every honest update is accepted.
    assert sum(isinstance(o, Rejected) for o in first) <= len(HONEST) // 2
    assert all(isinstance(o, Accepted) for o in second + third)
    assert state.version == 8 + 2 + sum(isinstance(o, Accepted) for o in first) + 8


def test_one_worker_sending_many_tiny_updates_cannot_make_honest_ones_too_large() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=3.0)
    _round(state, 1.0, *HONEST)

    tiny = _round(state, 0.001, *["h"] * 60)
    honest = _round(state, 1.0, *HONEST) + _round(state, 2.0, *HONEST)

    assert all(isinstance(o, Accepted) for o in tiny)
    assert all(isinstance(o, Accepted) for o in honest)


def test_one_worker_cannot_creep_its_bound_up_with_ever_larger_updates() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=3.0)
    _round(state, 1.0, *HONEST)

    # Each 1.2 x the one before, well inside 3 x the ones before it: with a median of recent
    # accepted norms, its own updates soon were the median, and the bound rose with them.
    scales = [1.2**k for k in range(40)]
    creeping = [state.offer(_update(state, s, worker="h"), now=1.0) for s in scales]
    honest = _round(state, 1.0, *HONEST)

    for scale, outcome in zip(scales, creeping, strict=True):
        assert isinstance(outcome, Accepted) == (scale <= 3.0), scale
    assert all(isinstance(o, Accepted) for o in honest)


def test_one_worker_growing_its_updates_does_not_make_the_bound_reject_honest_ones() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=3.0)
    _round(state, 1.0, *HONEST)

    for k in range(20):
        state.offer(_update(state, 1.1**k, worker="h"), now=1.0)
        assert all(isinstance(o, Accepted) for o in _round(state, 1.0, *HONEST))


def test_a_single_huge_update_is_rejected_among_honest_traffic() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)
    _round(state, 1.0, *HONEST)
    model = {name: a.copy() for name, a in state.model.items()}

    outcome = state.offer(_update(state, 1000.0, worker="h"), now=2.0)

    assert isinstance(outcome, Rejected) and outcome.reason == "norm_too_large"
    assert all(np.array_equal(state.model[n], model[n]) for n in model)
