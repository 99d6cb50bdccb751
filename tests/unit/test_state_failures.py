"""The aggregator's state when a worker reports it cannot train the job."""

from __future__ import annotations

import numpy as np
from known_task_key import KEY, task_id

from aggregator.state import Accepted, JobState
from shared.jobs import JobSpec, StrategyConfig
from shared.messages import Job, Update


def _state(name: str) -> JobState:
    spec = JobSpec(strategy=StrategyConfig(name=name))
    initial = {"w": np.zeros(2, np.float32)}
    return JobState(Job("job1", spec), initial, 0.0, worker_timeout_s=60, task_key=KEY)


def _update(worker: str) -> Update:
    tensors = {"w": np.ones(2, np.float32)}
    task = task_id("job1", worker, 0)
    return Update("job1", f"u-{worker}", worker, task, 0, 0, "weights", 10, tensors)


def test_a_failed_worker_gets_no_more_tasks_and_is_not_counted_alive() -> None:
    state = _state("fedasync")
    for worker in ("a", "b"):
        state.note_worker(worker, 0.0)

    first = state.note_failure("b", "task-b", "data_mismatch", "labels go up to 11")
    again = state.note_failure("b", "task-b", "data_mismatch", "labels go up to 11")
    state.note_worker("b", 1.0)  # its idle hellos go on

    assert (first, again) == (True, False)
    assert state.workers_to_task(1.0) == ["a"]
    assert state.alive_workers(1.0) == ["a"]
    assert state.failed == {"b": ("data_mismatch", "labels go up to 11")}


def test_a_fedavg_round_does_not_wait_for_a_worker_that_failed_its_task() -> None:
    state = _state("fedavg")
    for worker in ("a", "b"):
        state.note_worker(worker, 0.0)
        state.note_task(worker, f"task-{worker}", 0.0)

    outcome = state.offer(_update("a"), now=1.0)
    waiting = state.check_deadline(now=2.0)
    state.note_failure("b", "task-b", "data_mismatch", "labels go up to 11")

    assert isinstance(outcome, Accepted) and outcome.new_version is None
    assert waiting is None
    assert state.check_deadline(now=3.0) == 1
