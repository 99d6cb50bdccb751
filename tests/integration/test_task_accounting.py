"""What a site can claim in an update is checked against what the aggregator issued: an update
answers a task issued to its worker (unknown_task), a task is answered once (task_used), a worker
contributes once per FedAvg round (round_contributed), and a round does not wait again for a
worker that let an earlier deadline pass (docs/protocol.md, "What an update may claim")."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from memory_job import (
    MODEL,
    TOPOLOGY,
    FakeClock,
    aggregator,
    answer,
    broker_with_job,
    dead_letters,
    fedbuff_spec,
    read_history,
    tasks_sent,
)

from aggregator.state import REISSUE_GRACE_S
from broker import MemoryBroker, MemoryTransport
from broker.topology import UPDATE_ROUTING_KEY
from shared.jobs import JobSpec, StopConfig, StrategyConfig
from shared.messages import Hello, encode_message

pytestmark = pytest.mark.timeout(120)


def _hello(sender: MemoryTransport, worker_id: str) -> None:
    sender.publish(
        TOPOLOGY.updates, UPDATE_ROUTING_KEY, encode_message(Hello(worker_id, 10, "cpu"))
    )


def _fedavg(
    memory_workers: tuple[str, ...], deadline_s: float
) -> tuple[MemoryBroker, MemoryTransport]:
    """A FedAvg job that starts once every one of these workers said hello."""
    spec = JobSpec(
        name="t",
        model=MODEL,
        dataset="digits",
        strategy=StrategyConfig(
            name="fedavg", round_deadline_s=deadline_s, min_workers=len(memory_workers)
        ),
        stop=StopConfig(max_versions=10),
        eval_every=1000,
    )
    memory, sender = broker_with_job(spec)  # w0 said hello
    for worker_id in memory_workers:
        sender.declare_worker(worker_id)
        if worker_id != "w0":
            _hello(sender, worker_id)
    return memory, sender


def test_an_update_for_a_task_never_issued_to_its_worker_is_rejected_as_unknown_task(
    tmp_path: Path,
) -> None:
    memory, sender = broker_with_job(fedbuff_spec(buffer_size=1, max_versions=3))
    sender.declare_worker("w1")
    _hello(sender, "w1")
    service = aggregator(memory, tmp_path)
    service.run_until_idle()
    (task,) = tasks_sent(memory, "w0")
    answer(sender, task, "honest")  # version 1
    service.run_until_idle()

    answer(sender, replace(task, task_id="made-up"), "forged")
    answer(sender, replace(task, worker_id="w1"), "w0s-task-as-w1")  # w1 holds a task of its own
    answer(sender, replace(task, model=replace(task.model, version=1)), "another-version")
    service.run_until_idle()
    (following,) = tasks_sent(memory, "w0")
    answer(sender, following, "honest-2")
    service.run_until_idle()

    assert [reason for reason, _ in dead_letters(memory)] == ["unknown_task"] * 3
    assert [h["update_ids"] for h in read_history(tmp_path)[1:]] == [["honest"], ["honest-2"]]


def test_an_honest_update_replayed_under_a_new_update_id_is_rejected_as_task_used(
    tmp_path: Path,
) -> None:
    memory, sender = broker_with_job(fedbuff_spec(buffer_size=2, max_versions=3))
    service = aggregator(memory, tmp_path)
    service.run_until_idle()
    (first,) = tasks_sent(memory, "w0")

    answer(sender, first, "u1")
    answer(sender, first, "u1-again")  # the same result, a new update id
    service.run_until_idle()
    (second,) = tasks_sent(memory, "w0")  # sent once u1 was in
    answer(sender, second, "u2")
    service.run_until_idle()

    assert [reason for reason, _ in dead_letters(memory)] == ["task_used"]
    assert [h["update_ids"] for h in read_history(tmp_path)[1:]] == [["u1", "u2"]]
    assert service.metrics.updates_rejected.labels("task_used")._value.get() == 1


def test_a_site_holding_three_tasks_of_one_fedavg_round_contributes_one_update_to_it(
    tmp_path: Path,
) -> None:
    memory, sender = _fedavg(("w0", "w1"), deadline_s=3600.0)
    clock = FakeClock()
    service = aggregator(memory, tmp_path, clock=clock)
    service.run_until_idle()
    for _ in range(2):  # idle hellos past the grace: the aggregator re-issues the "lost" task
        clock.now += REISSUE_GRACE_S + 1
        _hello(sender, "w0")
        service.run_until_idle()
    held = tasks_sent(memory, "w0")
    assert len(held) == 3 and {t.round for t in held} == {0}

    for k, task in enumerate(held):
        answer(sender, task, f"w0-{k}", value=1.0)
    (honest,) = tasks_sent(memory, "w1")
    answer(sender, honest, "w1-0", value=0.0)
    service.run_until_idle()

    assert [reason for reason, _ in dead_letters(memory)] == ["round_contributed"] * 2
    history = read_history(tmp_path)
    assert [h["update_ids"] for h in history[1:]] == [["w0-0", "w1-0"]]


def test_rounds_after_a_missed_deadline_do_not_wait_for_a_worker_that_never_trains(
    tmp_path: Path,
) -> None:
    memory, sender = _fedavg(("w0", "w1", "idle"), deadline_s=30.0)
    clock = FakeClock()
    service = aggregator(memory, tmp_path, clock=clock)
    service.run_until_idle()
    for worker_id in ("w0", "w1"):
        (task,) = tasks_sent(memory, worker_id)
        answer(sender, task, f"{worker_id}-r0")
    service.run_until_idle()
    waited = service.status()["version"]  # round 0 waits for "idle", which holds a task
    clock.now += 31.0
    service.run_until_idle()  # round 0 closes at its deadline with the two updates

    for worker_id in ("w0", "w1"):
        (task,) = tasks_sent(memory, worker_id)
        assert task.round == 1
        answer(sender, task, f"{worker_id}-r1")
    service.run_until_idle()  # the clock has not moved: round 1 closes on these two updates

    assert waited == 0
    assert service.status()["version"] == 2
    history = read_history(tmp_path)
    assert [h["update_ids"] for h in history[1:]] == [["w0-r0", "w1-r0"], ["w0-r1", "w1-r1"]]
    assert len(tasks_sent(memory, "idle")) == 3  # it still gets a task every round
    assert service.metrics.worker_failures.labels("missed_deadline")._value.get() == 1
