"""Evaluation runs beside the aggregator's loop: updates and tasks never wait for it."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from memory_job import (
    JOB_ID,
    MODEL,
    SHAPES,
    TOPOLOGY,
    aggregator,
    broker_with_job,
    fedbuff_spec,
    read_history,
    send_delta,
)

from aggregator.evaluation import BackgroundEvaluator, Evaluator
from aggregator.service import AggregatorService
from broker import MemoryTransport
from broker.topology import UPDATE_ROUTING_KEY
from shared.messages import Task, Update, decode_message, encode_message

SPEC = fedbuff_spec(buffer_size=1, max_versions=10)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Evaluations block until the test sets the gate (set at the end whatever happens)."""
    event = threading.Event()
    original = Evaluator.evaluate

    def slow(self: Evaluator, tensors: Mapping[str, np.ndarray]) -> tuple[float, float]:
        assert event.wait(30), "the test never opened the gate"
        return original(self, tensors)

    monkeypatch.setattr(Evaluator, "evaluate", slow)
    yield event
    event.set()


def _answer_newest_task(worker: MemoryTransport, update_id: str) -> None:
    """Take every task waiting for w0 and answer the newest, as a worker would."""
    tasks = []
    while (delivery := worker.receive(0)) is not None:
        worker.ack(delivery)
        tasks.append(decode_message(delivery.body))
    task = tasks[-1]
    assert isinstance(task, Task)
    tensors = {name: np.full(a.shape, 0.01, a.dtype) for name, a in SHAPES.items()}
    update = Update(JOB_ID, update_id, "w0", task.task_id, task.version, None, "delta", 10,
                    tensors, {"loss": 1.0}, sent_at=0.0)  # fmt: skip
    worker.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, encode_message(update))


def _drain(service: AggregatorService) -> None:
    """Handle every waiting message without waiting for evaluations."""
    while service.step(0.05):
        pass


@pytest.mark.timeout(60)
def test_versions_and_tasks_go_on_while_an_evaluation_is_still_running(
    tmp_path: Path, gate: threading.Event
) -> None:
    memory, _ = broker_with_job(SPEC)
    service = aggregator(memory, tmp_path)
    worker = MemoryTransport(memory, TOPOLOGY)
    worker.subscribe(TOPOLOGY.task_queue("w0"))
    _drain(service)  # the job starts; version 0 goes to the evaluator, which is stuck
    for i in (1, 2, 3):
        _answer_newest_task(worker, f"u{i}")
        _drain(service)

    # Three versions made, and a task sent with each, while version 0 was still being scored.
    assert service.status()["version"] == 3
    assert memory.depth(TOPOLOGY.task_queue("w0")) == 1
    assert read_history(tmp_path) == []  # version 0 heads the history and is not scored yet

    gate.set()
    service.run_until_idle()

    history = read_history(tmp_path)
    assert [h["version"] for h in history] == [0, 1, 2, 3]
    # 0 ran first; 1 and 2 waited in turn and 2 displaced 1; 3 displaced 2.
    assert [h["accuracy"] is not None for h in history] == [True, False, False, True]
    assert service.metrics.evaluations_skipped._value.get() == 2
    assert [h["update_ids"] for h in history] == [[], ["u1"], ["u2"], ["u3"]]


@pytest.mark.timeout(60)
def test_history_lines_still_waiting_for_an_evaluation_are_written_once_after_a_crash(
    tmp_path: Path, gate: threading.Event
) -> None:
    memory, sender = broker_with_job(SPEC)
    first = aggregator(memory, tmp_path)
    _drain(first)
    send_delta(sender, "u1", 0, 0.01)
    send_delta(sender, "u2", 1, 0.01)
    _drain(first)  # versions 1 and 2 checkpointed while version 0 is still being evaluated
    assert read_history(tmp_path) == []

    first.transport.close()  # the crash
    gate.set()
    second = aggregator(memory, tmp_path)
    second.run_until_idle()
    send_delta(sender, "u3", 2, 0.01)
    second.run_until_idle()

    history = read_history(tmp_path)
    assert [h["version"] for h in history] == [0, 1, 2, 3]
    assert [h["update_ids"] for h in history] == [[], ["u1"], ["u2"], ["u3"]]
    assert history[-1]["accuracy"] is not None


def test_a_failed_evaluation_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    evaluator = Evaluator(MODEL, "digits", 1000, "cpu")

    def broken(tensors: Mapping[str, np.ndarray]) -> tuple[float, float]:
        raise RuntimeError("no memory left")

    monkeypatch.setattr(evaluator, "evaluate", broken)
    background = BackgroundEvaluator(evaluator)
    try:
        background.submit(7, SHAPES)
        (result,) = background.wait()
    finally:
        background.close()

    assert result.version == 7 and result.accuracy is None
    assert result.error is not None and "no memory left" in result.error


def test_the_background_evaluator_scores_versions_as_the_model_would() -> None:
    evaluator = Evaluator(MODEL, "digits", 1000, "cpu")
    expected = evaluator.evaluate(SHAPES)
    background = BackgroundEvaluator(evaluator)
    try:
        assert background.submit(0, SHAPES) is None
        (result,) = background.wait()
    finally:
        background.close()

    assert (result.accuracy, result.loss) == expected
    assert result.seconds > 0
