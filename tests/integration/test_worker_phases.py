"""The worker service's wall-clock by phase, and its prompt publishing, on the in-process broker."""

from __future__ import annotations

import logging
import time

import pytest
from memory_job import memory_worker

from broker import MemoryBroker, MemoryTransport, Topology
from shared.jobs import ModelSpec, TrainingConfig
from shared.messages import GlobalModel, Task, Update, decode_message, encode_message
from shared.models import build_model, state_to_numpy
from worker.metrics import PHASES
from worker.service import WorkerService

TOPOLOGY = Topology("fedq")
MODEL = ModelSpec("mlp", (1, 8, 8), 10)


@pytest.fixture
def memory() -> MemoryBroker:
    broker = MemoryBroker()
    MemoryTransport(broker, TOPOLOGY).declare()
    return broker


def _worker(memory: MemoryBroker, poll_interval_s: float = 0.5) -> WorkerService:
    return memory_worker(memory, poll_interval_s=poll_interval_s)


def _send_task(sender: MemoryTransport, version: int) -> None:
    task = Task(
        "job",
        f"task-v{version}",
        "w0",
        None,
        TrainingConfig(max_batches=2),
        GlobalModel("job", version, MODEL, state_to_numpy(build_model(MODEL, seed=0))),
    )
    sender.publish(TOPOLOGY.tasks, "w0", encode_message(task))


def _phases(worker: WorkerService) -> dict[str, float]:
    return {p: worker.metrics.phase_seconds.labels(p)._value.get() for p in PHASES}


def _step_until_sent(worker: WorkerService, count: int) -> None:
    deadline = time.monotonic() + 20
    while worker.updates_sent < count and time.monotonic() < deadline:
        worker.step(0.05)


@pytest.mark.timeout(60)
def test_the_phases_add_up_to_the_time_from_the_first_task_to_the_last_update(
    memory: MemoryBroker,
) -> None:
    worker = _worker(memory)
    worker.start()
    sender = MemoryTransport(memory, TOPOLOGY)
    sender.subscribe(TOPOLOGY.updates)

    started = time.perf_counter()
    _send_task(sender, 1)
    _step_until_sent(worker, 1)
    time.sleep(0.3)  # the aggregator taking its time over the next task
    _send_task(sender, 2)
    _step_until_sent(worker, 2)
    elapsed = time.perf_counter() - started

    phases = _phases(worker)
    updates = []
    while (d := sender.receive(0)) is not None:
        updates += [m for m in [decode_message(d.body)] if isinstance(m, Update)]
    assert [u.base_version for u in updates] == [1, 2]
    assert all(v >= 0 for v in phases.values())
    assert phases["train"] > 0
    assert 0.3 <= sum(phases.values()) <= elapsed
    # The task was made after the pause: the wait is the aggregator's, not delivery's.
    assert phases["wait_aggregator"] >= 0.25
    assert phases["wait_delivery"] < 0.1


@pytest.mark.timeout(60)
def test_a_worker_publishes_when_training_ends_rather_than_at_its_next_poll(
    memory: MemoryBroker,
) -> None:
    worker = _worker(memory, poll_interval_s=10.0)
    worker.start()
    sender = MemoryTransport(memory, TOPOLOGY)
    _send_task(sender, 1)
    worker.step(0)  # takes the task and starts training
    assert worker.busy

    started = time.monotonic()
    worker.step(10.0)
    waited = time.monotonic() - started

    assert worker.updates_sent == 1
    assert waited < 5.0
    assert _phases(worker)["handoff"] < 1.0


@pytest.mark.timeout(60)
def test_a_worker_logs_the_task_it_takes_for_training_before_training_it(
    memory: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # Slowed a thousandfold (until stop()): without the line it would look stuck.
    worker = memory_worker(memory, slowdown=1000.0)
    worker.start()
    _send_task(MemoryTransport(memory, TOPOLOGY), 3)
    with caplog.at_level(logging.INFO, logger="worker.service"):
        while not worker.busy:
            worker.step(0.05)
    try:
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert messages == [
            "job job task task-v3 version 3: training on worker w0 (slowdown 1000x)"
        ]
    finally:
        worker.stop()  # cuts the slowdown short
        worker.close()
