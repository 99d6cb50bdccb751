"""The norm bound: an update whose change is far larger than recent accepted ones is rejected."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from aggregator.checkpoint import decode_checkpoint, encode_checkpoint
from aggregator.state import NORM_WINDOW, Accepted, JobState, Rejected
from shared.errors import ConfigError
from shared.jobs import JobSpec, StrategyConfig
from shared.messages import Job, Update

_ids = itertools.count()


def _state(**strategy: object) -> JobState:
    spec = JobSpec(strategy=StrategyConfig(**strategy))  # type: ignore[arg-type]
    initial = {"w": np.zeros(4, np.float32), "steps": np.array(0, np.int64)}
    return JobState(Job("job1", spec), initial, started_at=0.0, worker_timeout_s=60)


def _update(state: JobState, scale: float, kind: str = "delta") -> Update:
    """An update whose change from the state's model is `scale` * [1, 1, 1, 1] (norm 2 * scale)."""
    base = np.zeros(4, np.float32) if kind == "delta" else state.model["w"]
    w = (base + np.float32(scale)).astype(np.float32)
    return Update(
        job_id="job1",
        update_id=f"u{next(_ids)}",
        worker_id="a",
        task_id=state.tasks.issue("a", state.version),
        base_version=state.version,
        round=None,
        kind=kind,
        num_samples=10,
        # A huge integer buffer: only floating-point tensors count towards the norm.
        tensors={"w": w, "steps": np.array(10**12, np.int64)},
    )


def _feed(state: JobState, *scales: float, kind: str = "delta") -> list[object]:
    return [state.offer(_update(state, s, kind), now=1.0) for s in scales]


def test_an_update_far_beyond_the_median_of_accepted_ones_is_rejected_as_norm_too_large() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)
    _feed(state, 1.0, 1.2, 0.8)
    model = {name: a.copy() for name, a in state.model.items()}

    outcome = state.offer(_update(state, 100.0), now=2.0)

    assert isinstance(outcome, Rejected) and outcome.reason == "norm_too_large"
    assert "median 2" in outcome.detail
    assert state.rejected == {"norm_too_large": 1}
    assert all(np.array_equal(state.model[n], model[n]) for n in model)


def test_updates_within_the_ratio_of_the_median_are_accepted() -> None:
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


def test_the_bound_is_inactive_until_three_updates_were_accepted() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=2.0)

    outcomes = _feed(state, 1.0, 100.0, 10_000.0)
    fourth = state.offer(_update(state, 1e7), now=2.0)

    assert all(isinstance(o, Accepted) for o in outcomes)
    assert isinstance(fourth, Rejected) and fourth.reason == "norm_too_large"


def test_without_a_ratio_no_update_is_rejected_for_its_norm() -> None:
    state = _state(name="fedbuff", buffer_size=1)

    outcomes = _feed(state, 1.0, 1.0, 1.0, 1e6)

    assert all(isinstance(o, Accepted) for o in outcomes)


def test_rejected_updates_do_not_move_the_median() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=2.0)
    _feed(state, 1.0, 1.0, 1.0)

    rejected = _feed(state, 50.0, 50.0, 50.0, 50.0)
    normal = state.offer(_update(state, 1.5), now=2.0)

    assert all(isinstance(o, Rejected) for o in rejected)
    assert isinstance(normal, Accepted)


def test_only_the_last_fifty_accepted_norms_make_the_median() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=2.0)
    _feed(state, *([1.0] * NORM_WINDOW))
    _feed(state, *([1.9] * NORM_WINDOW))  # each within 2 x the median of the window before it

    outcome = state.offer(_update(state, 3.5), now=2.0)

    assert isinstance(outcome, Accepted), "1.0s were pushed out; the median is 1.9 x 2 now"


def test_the_accepted_norms_survive_a_snapshot_and_restore_through_a_checkpoint() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)
    _feed(state, 1.0, 1.2, 0.8)
    _, snap, _ = decode_checkpoint(encode_checkpoint("job1", state.snapshot(5.0), {}))
    restored = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)

    restored.restore(snap, now=6.0)
    outcome = restored.offer(_update(restored, 100.0), now=7.0)

    assert snap["accepted_norms"] == pytest.approx([2.0, 2.4, 1.6])
    assert isinstance(outcome, Rejected) and outcome.reason == "norm_too_large"


def test_a_snapshot_without_accepted_norms_restores_with_the_bound_starting_afresh() -> None:
    state = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)
    _feed(state, 1.0, 1.2, 0.8)
    snap = state.snapshot(5.0)
    del snap["accepted_norms"]
    restored = _state(name="fedbuff", buffer_size=1, max_update_norm_ratio=10.0)

    restored.restore(snap, now=6.0)
    outcome = restored.offer(_update(restored, 100.0), now=7.0)

    assert isinstance(outcome, Accepted)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.0, -3.0, float("nan")])
def test_a_ratio_of_one_or_less_is_a_config_error(ratio: float) -> None:
    with pytest.raises(ConfigError, match="max_update_norm_ratio"):
        StrategyConfig(max_update_norm_ratio=ratio)
