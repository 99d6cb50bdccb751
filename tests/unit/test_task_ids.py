"""Task ids the aggregator verifies without a list of them, and the state's rules on what an
update may claim: its task, one update per task, one per worker and FedAvg round."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from aggregator.state import Accepted, JobState, Rejected
from aggregator.tasks import TASK_KEY_FILE, TaskIds, load_task_key
from shared.errors import ConfigError
from shared.jobs import JobSpec, StrategyConfig
from shared.messages import ID_PATTERN, Job, Update

_ids = itertools.count()


def test_a_task_id_verifies_only_for_the_job_worker_and_version_it_was_issued_for() -> None:
    tasks = TaskIds(bytes(32), "job1")
    task_id = tasks.issue("a", 3)

    assert ID_PATTERN.match(task_id)
    assert tasks.verify(task_id, "a", 3)
    assert not tasks.verify(task_id, "b", 3)
    assert not tasks.verify(task_id, "a", 2)
    assert not TaskIds(bytes(32), "job2").verify(task_id, "a", 3)
    assert not TaskIds(bytes(31) + b"\x01", "job1").verify(task_id, "a", 3)
    other_mac = task_id[:-1] + ("1" if task_id.endswith("0") else "0")
    assert not tasks.verify("t", "a", 3) and not tasks.verify(other_mac, "a", 3)
    assert tasks.issue("a", 3) != task_id  # a fresh nonce each time


def test_the_task_key_is_created_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    key = load_task_key(tmp_path)

    assert len(key) == 32
    assert (tmp_path / TASK_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert load_task_key(tmp_path) == key


def test_a_damaged_task_key_stops_the_start_with_a_config_error(tmp_path: Path) -> None:
    (tmp_path / TASK_KEY_FILE).write_text("not hex\n")

    with pytest.raises(ConfigError, match="task key"):
        load_task_key(tmp_path)


def _state(name: str, **strategy: object) -> JobState:
    spec = JobSpec(strategy=StrategyConfig(name=name, **strategy))  # type: ignore[arg-type]
    return JobState(Job("job1", spec), {"w": np.zeros(2, np.float32)}, 0.0, worker_timeout_s=60)


def _update(state: JobState, worker: str, task_id: str, base: int, value: float = 1.0) -> Update:
    kind = state.update_kind
    tensors = {"w": np.full(2, value, np.float32)}
    return Update("job1", f"u{next(_ids)}", worker, task_id, base, state.round, kind, 10, tensors)


def _issue(state: JobState, worker: str, now: float = 0.0) -> str:
    state.note_worker(worker, now)
    task_id = state.new_task_id(worker)
    state.note_task(worker, task_id, now)
    return task_id


def test_an_async_task_is_answered_once_and_the_next_task_of_the_same_version_again() -> None:
    state = _state("fedbuff", buffer_size=3)
    first = _issue(state, "a")
    state.offer(_update(state, "a", first, 0), now=1.0)
    second = _issue(state, "a")  # the version did not move: the same base version

    replay = state.offer(_update(state, "a", first, 0), now=2.0)
    answer = state.offer(_update(state, "a", second, 0), now=2.0)

    assert isinstance(replay, Rejected) and replay.reason == "task_used"
    assert isinstance(answer, Accepted)


def test_a_late_fedavg_update_of_the_previous_round_is_taken_once_besides_the_current_one() -> None:
    state = _state("fedavg", round_deadline_s=10.0)
    slow_first = _issue(state, "slow")
    slow_second = _issue(state, "slow", now=11.0)  # re-issued after its idle hello
    fast = _issue(state, "fast")
    state.offer(_update(state, "fast", fast, 0), now=1.0)
    assert state.check_deadline(now=12.0) == 1  # round 0 closed without "slow"
    current = _issue(state, "slow", now=12.0)

    late = state.offer(_update(state, "slow", slow_first, 0), now=13.0)
    late_again = state.offer(_update(state, "slow", slow_second, 0), now=13.0)
    on_time = state.offer(_update(state, "slow", current, 1), now=14.0)

    assert isinstance(late, Accepted) and late.staleness == 1
    assert isinstance(late_again, Rejected) and late_again.reason == "round_contributed"
    assert isinstance(on_time, Accepted)


def test_a_worker_that_missed_a_deadline_is_waited_for_again_once_it_sends_an_update() -> None:
    state = _state("fedavg", round_deadline_s=10.0)
    tasks = {worker: _issue(state, worker) for worker in ("a", "b")}
    state.offer(_update(state, "a", tasks["a"], 0), now=1.0)
    assert state.check_deadline(now=10.0) == 1
    assert state.take_missed_deadline() == ["b"] and state.take_missed_deadline() == []

    tasks = {worker: _issue(state, worker, now=10.0) for worker in ("a", "b")}
    state.offer(_update(state, "a", tasks["a"], 1), now=11.0)
    not_waited = state.version  # round 1 closed on "a" alone
    tasks = {worker: _issue(state, worker, now=11.0) for worker in ("a", "b")}
    state.offer(_update(state, "b", tasks["b"], 2), now=12.0)  # "b" is back
    state.offer(_update(state, "a", tasks["a"], 2), now=12.0)
    tasks = {worker: _issue(state, worker, now=12.0) for worker in ("a", "b")}
    state.offer(_update(state, "a", tasks["a"], 3), now=13.0)

    assert not_waited == 2
    assert state.version == 3  # round 3 waits for "b" again
    assert state.take_missed_deadline() == []
