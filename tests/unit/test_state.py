"""The aggregator's state machine: accept/reject rules, rounds, buffers, versions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from known_task_key import KEY, task_id

from aggregator.state import Accepted, JobState, Rejected, WorkerRegistry
from shared.jobs import JobSpec, StrategyConfig
from shared.messages import Job, Update

_ids = itertools.count()


def _state(registry: WorkerRegistry | None = None, **strategy: object) -> JobState:
    spec = JobSpec(strategy=StrategyConfig(**strategy))  # type: ignore[arg-type]
    initial = {"w": np.zeros(2, np.float32), "steps": np.array(0, np.int64)}
    return JobState(
        Job("job1", spec),
        initial,
        started_at=0.0,
        worker_timeout_s=60,
        task_key=KEY,
        registry=registry,
    )


def _update(
    w: list[float],
    worker: str = "a",
    base: int = 0,
    n: int = 10,
    kind: str = "weights",
    update_id: str | None = None,
    job: str = "job1",
    **tensors: np.ndarray,
) -> Update:
    values = {"w": np.array(w, np.float32), "steps": np.array(1, np.int64)} | tensors
    return Update(
        job_id=job,
        update_id=update_id or f"u{next(_ids)}",
        worker_id=worker,
        task_id=task_id(job, worker, base),
        base_version=base,
        round=None,
        kind=kind,
        num_samples=n,
        tensors=values,
        metrics={"loss": 0.5},
    )


def _with_workers(state: JobState, *workers: str) -> JobState:
    for worker in workers:
        state.note_worker(worker, 0.0)
        state.note_task(worker, f"task-{worker}", 0.0)
    return state


def test_a_fedavg_round_closes_when_every_selected_worker_answered() -> None:
    state = _with_workers(_state(name="fedavg"), "a", "b")

    first = state.offer(_update([2.0, 2.0], "a", n=10), now=1.0)
    second = state.offer(_update([8.0, 8.0], "b", n=30), now=2.0)

    assert first == Accepted(first.update_id, 0, None)  # type: ignore[union-attr]
    assert isinstance(second, Accepted) and second.new_version == 1
    np.testing.assert_allclose(state.model["w"], [6.5, 6.5])
    assert state.round == 1


def test_a_fedavg_round_closes_on_its_deadline_with_the_updates_it_has() -> None:
    state = _with_workers(_state(name="fedavg", round_deadline_s=5.0), "a", "b")
    state.offer(_update([2.0, 2.0], "a"), now=1.0)

    assert state.check_deadline(now=4.0) is None
    assert state.check_deadline(now=6.0) == 1
    np.testing.assert_allclose(state.model["w"], [2.0, 2.0])


def test_a_fedavg_round_with_nothing_in_it_does_not_close_on_the_deadline() -> None:
    state = _with_workers(_state(name="fedavg", round_deadline_s=5.0), "a")

    assert state.check_deadline(now=100.0) is None
    assert state.version == 0


def test_a_duplicate_update_id_is_rejected_and_counted_once() -> None:
    state = _with_workers(_state(name="fedbuff", buffer_size=5), "a")
    update = _update([1.0, 1.0], kind="delta", update_id="same")

    state.offer(update, now=1.0)
    again = state.offer(update, now=2.0)

    assert isinstance(again, Rejected) and again.reason == "duplicate"
    assert state.accepted == 1


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (_update([1.0, 1.0], base=3), "future_version"),
        (_update([1.0, 1.0], kind="delta"), "wrong_kind"),
        (_update([1.0, 1.0, 1.0]), "bad_shape"),
        (_update([np.nan, 1.0]), "not_finite"),
        (_update([np.inf, 1.0]), "not_finite"),
        (_update([1.0, 1.0], extra=np.zeros(1, np.float32)), "bad_names"),
    ],
)
def test_invalid_updates_are_rejected_with_their_reason_and_leave_the_model_alone(
    update: Update, reason: str
) -> None:
    state = _with_workers(_state(name="fedasync"), "a")

    outcome = state.offer(update, now=1.0)

    assert isinstance(outcome, Rejected) and outcome.reason == reason
    np.testing.assert_array_equal(state.model["w"], [0.0, 0.0])
    assert state.version == 0 and state.rejected == {reason: 1}


def test_an_update_with_a_wrong_dtype_is_rejected() -> None:
    state = _state(name="fedasync")
    update = _update([1.0, 1.0])
    update.tensors["w"] = update.tensors["w"].astype(np.float64)

    outcome = state.offer(update, now=1.0)

    assert isinstance(outcome, Rejected) and outcome.reason == "bad_dtype"


def test_updates_staler_than_max_staleness_are_rejected_as_too_stale() -> None:
    state = _with_workers(_state(name="fedasync", max_staleness=1), "a")
    for _ in range(3):
        state.offer(_update([1.0, 1.0], base=state.version), now=1.0)

    outcome = state.offer(_update([1.0, 1.0], base=0), now=2.0)

    assert isinstance(outcome, Rejected) and outcome.reason == "too_stale"


def test_fedbuff_makes_a_version_every_k_updates_from_deltas() -> None:
    state = _with_workers(_state(name="fedbuff", buffer_size=2, staleness="constant"), "a", "b")

    first = state.offer(_update([1.0, 2.0], "a", kind="delta"), now=1.0)
    second = state.offer(_update([3.0, 4.0], "b", kind="delta"), now=2.0)

    assert isinstance(first, Accepted) and first.new_version is None
    assert isinstance(second, Accepted) and second.new_version == 1
    np.testing.assert_allclose(state.model["w"], [2.0, 3.0])


def test_fedasync_makes_a_version_per_update_with_a_staleness_discounted_alpha() -> None:
    state = _state(name="fedasync", alpha=0.5, staleness="polynomial", staleness_a=1.0)
    state.offer(_update([4.0, 4.0], base=0), now=1.0)  # alpha 0.5 -> [2, 2]

    outcome = state.offer(_update([10.0, 10.0], base=0), now=2.0)  # staleness 1: alpha 0.25

    assert isinstance(outcome, Accepted) and outcome.new_version == 2
    np.testing.assert_allclose(state.model["w"], [4.0, 4.0])


def test_each_version_records_the_update_ids_it_folded_in() -> None:
    state = _with_workers(_state(name="fedbuff", buffer_size=2), "a", "b")
    state.offer(_update([1.0, 1.0], "a", kind="delta", update_id="first"), now=1.0)
    state.offer(_update([1.0, 1.0], "b", kind="delta", update_id="second"), now=2.0)

    record = state.last_record

    assert record is not None and record.version == 1
    assert record.update_ids == ["first", "second"]
    assert record.time_s == 2.0 and record.train_loss == pytest.approx(0.5)


def test_async_strategies_task_every_idle_worker() -> None:
    state = _state(name="fedbuff")
    state.note_worker("a", 0.0)
    state.note_worker("b", 0.0)
    state.note_task("a", "t1", 0.0)

    assert state.workers_to_task(now=1.0) == ["b"]


def test_workers_not_seen_for_longer_than_the_timeout_get_no_task() -> None:
    state = _state(name="fedasync")
    state.note_worker("gone", 0.0)
    state.note_worker("here", 100.0)

    assert state.workers_to_task(now=100.0) == ["here"]


def test_a_job_counts_the_hellos_its_registry_received_before_it_started() -> None:
    registry = WorkerRegistry()
    registry.note_hello("early", 0.0)
    registry.note_hello("gone", -100.0)

    state = _state(registry, name="fedasync")

    assert state.workers == {"early", "gone"}
    assert state.workers_to_task(now=1.0) == ["early"]


def test_an_update_keeps_its_worker_alive_in_its_job_but_is_no_hello_for_the_next() -> None:
    registry = WorkerRegistry()
    first = _state(registry, name="fedbuff", buffer_size=5)
    first.note_worker("a", 0.0)
    outcome = first.offer(_update([1.0, 1.0], "a", kind="delta"), now=50.0)

    second = _state(registry, name="fedbuff", buffer_size=5)

    assert isinstance(outcome, Accepted)
    assert first.alive_workers(now=100.0) == ["a"], "seen 50 s ago, by its update"
    assert second.alive_workers(now=100.0) == [], "its last hello was 100 s ago"
    assert registry.active(now=100.0, timeout_s=60) == 0


def test_a_worker_trains_at_most_once_per_synchronous_round() -> None:
    state = _with_workers(_state(name="fedavg"), "a", "b")
    state.offer(_update([1.0, 1.0], "a"), now=1.0)

    assert state.workers_to_task(now=2.0) == []


def test_a_task_lost_by_a_restarted_worker_is_issued_again_after_the_grace_period() -> None:
    state = _with_workers(_state(name="fedavg"), "a")

    state.note_idle("a", now=1.0)
    assert state.workers_to_task(now=1.0) == []
    state.note_idle("a", now=30.0)
    assert state.workers_to_task(now=30.0) == ["a"]


def test_fraction_selects_that_share_of_the_alive_workers_per_round() -> None:
    state = _state(name="fedavg", fraction=0.5)
    for worker in "abcd":
        state.note_worker(worker, 0.0)

    chosen = state.workers_to_task(now=1.0)

    assert len(chosen) == 2 and set(chosen) <= set("abcd")
