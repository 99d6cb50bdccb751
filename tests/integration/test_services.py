"""The aggregator and worker services wired on the in-process broker, message by message."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
from memory_job import dead_letters, memory_worker
from prometheus_client import CollectorRegistry

from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker import MemoryBroker, MemoryTransport, Topology
from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY, DeadLetter, read_dead_letter
from shared.chunks import split_payload
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import (
    Failure,
    GlobalModel,
    Hello,
    Job,
    Task,
    Update,
    decode_message,
    encode_message,
)
from shared.models import build_model, state_to_numpy
from worker.service import WorkerService

TOPOLOGY = Topology("fedq")
MODEL = ModelSpec("mlp", (1, 8, 8), 10)


def _spec(strategy: str = "fedasync", max_versions: int = 3) -> JobSpec:
    return JobSpec(
        name="t",
        model=MODEL,
        dataset="digits",
        strategy=StrategyConfig(name=strategy, buffer_size=2),
        training=TrainingConfig(batch_size=16, lr=0.1),
        stop=StopConfig(max_versions=max_versions),
    )


@pytest.fixture
def memory() -> MemoryBroker:
    broker = MemoryBroker()
    MemoryTransport(broker, TOPOLOGY).declare()
    return broker


def _aggregator(memory: MemoryBroker, tmp_path: Path, max_jobs: int = 0) -> AggregatorService:
    settings = AggregatorSettings(broker="memory", state_dir=str(tmp_path), max_jobs=max_jobs)
    service = AggregatorService(
        MemoryTransport(memory, TOPOLOGY), settings, AggregatorMetrics(CollectorRegistry())
    )
    service.transport.subscribe(TOPOLOGY.jobs)
    service.transport.subscribe(TOPOLOGY.updates)
    return service


def _worker(memory: MemoryBroker, worker_id: str, slowdown: float = 1.0) -> WorkerService:
    return memory_worker(memory, worker_id, slowdown=slowdown)


def _submit(memory: MemoryBroker, job_id: str, spec: JobSpec) -> None:
    MemoryTransport(memory, TOPOLOGY).publish(
        TOPOLOGY.jobs, JOB_ROUTING_KEY, encode_message(Job(job_id, spec))
    )


def _run_worker(worker: WorkerService) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(60)
def test_a_job_on_the_queue_is_trained_by_workers_and_written_out(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path, max_jobs=1)
    workers = [_worker(memory, f"w{i}") for i in range(2)]
    threads = [_run_worker(w) for w in workers]
    _submit(memory, "job-1", _spec("fedasync", max_versions=4))

    aggregator.run()
    for w in workers:
        w.stop()
    for t in threads:
        t.join(10)

    out = tmp_path / "jobs" / "job-1"
    summary = json.loads((out / "summary.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert summary["versions"] == 4 and summary["stop_reason"] == "max_versions"
    assert [h["version"] for h in history] == [0, 1, 2, 3, 4]
    assert (out / "model.safetensors").exists()
    assert sum(w.updates_sent for w in workers) >= 4


@pytest.mark.timeout(60)
def test_malformed_messages_are_dead_lettered_with_a_reason_and_the_service_goes_on(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path)
    sender = MemoryTransport(memory, TOPOLOGY)
    bad = [
        b"\xc1 not msgpack",
        msgpack.packb({"protocol": 99, "type": "update"}),
        msgpack.packb({"protocol": 1, "type": "surprise"}),
        msgpack.packb({"protocol": 1, "type": "update", "job_id": "j"}),
    ]
    for body in bad:
        sender.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, body)

    aggregator.run_until_idle()

    reasons = [reason for reason, _ in dead_letters(memory)]
    assert reasons == ["malformed", "protocol_version", "unknown_type", "missing_field"]
    rejected = aggregator.metrics.updates_rejected
    assert rejected.labels("malformed")._value.get() == 1
    assert memory.depth(TOPOLOGY.updates) == 0


@pytest.mark.timeout(60)
def test_an_update_for_a_job_that_is_not_running_is_rejected_as_unknown_job(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path)
    update = Update(
        job_id="nobody",
        update_id="u1",
        worker_id="w0",
        task_id="t1",
        base_version=0,
        round=None,
        kind="weights",
        num_samples=5,
        tensors={"w": np.zeros(2, np.float32)},
    )
    MemoryTransport(memory, TOPOLOGY).publish(
        TOPOLOGY.updates, UPDATE_ROUTING_KEY, encode_message(update)
    )

    aggregator.run_until_idle()

    assert [reason for reason, _ in dead_letters(memory)] == ["unknown_job"]


@pytest.mark.timeout(60)
def test_a_job_that_cannot_start_is_rejected_and_the_next_job_runs(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path, max_jobs=2)
    broken = JobSpec(model=ModelSpec("no-such-model", (1, 8, 8), 10), dataset="digits")
    _submit(memory, "broken", broken)
    _submit(memory, "good", _spec("fedasync", max_versions=1))
    worker = _worker(memory, "w0")
    thread = _run_worker(worker)

    aggregator.run()
    worker.stop()
    thread.join(10)

    assert [reason for reason, _ in dead_letters(memory)] == ["bad_job"]
    assert (tmp_path / "jobs" / "good" / "summary.json").exists()


@pytest.mark.timeout(60)
def test_a_worker_trains_the_newest_of_several_queued_tasks(memory: MemoryBroker) -> None:
    worker = _worker(memory, "w0")
    worker.start()
    sender = MemoryTransport(memory, TOPOLOGY)
    sender.declare()
    sender.subscribe(TOPOLOGY.updates)
    initial = state_to_numpy(build_model(MODEL, seed=0))
    for version in (3, 7, 5):
        task = Task(
            "job",
            f"task-v{version}",
            "w0",
            None,
            TrainingConfig(max_batches=1),
            GlobalModel("job", version, MODEL, initial),
        )
        sender.publish(TOPOLOGY.tasks, "w0", encode_message(task))

    while worker.updates_sent == 0:
        worker.step(0.05)

    messages = []
    while (d := sender.receive(0)) is not None:
        messages.append(decode_message(d.body))
    updates = [m for m in messages if isinstance(m, Update)]
    assert [(u.base_version, u.task_id) for u in updates] == [(7, "task-v7")]
    assert worker.metrics.tasks_superseded._value.get() == 2


def _refused_tasks(memory: MemoryBroker) -> list[tuple[DeadLetter, bytes]]:
    """What the broker dead-lettered: (who, why, from where) and the body, taken off the queue."""
    reader = MemoryTransport(memory, TOPOLOGY)
    reader.subscribe(TOPOLOGY.dead)
    taken = []
    while (delivery := reader.receive(0)) is not None:
        taken.append((read_dead_letter(delivery.headers), delivery.body))
        reader.ack(delivery)
    return taken


def _reports(listener: MemoryTransport) -> list[Failure]:
    """The failure reports on the updates queue (hellos are passed over)."""
    messages = []
    while (delivery := listener.receive(0)) is not None:
        messages.append(decode_message(delivery.body))
    return [m for m in messages if isinstance(m, Failure)]


def _worker_given_task(memory: MemoryBroker, body: bytes) -> tuple[WorkerService, MemoryTransport]:
    """Worker w0, started and stepped once with `body` on its task queue; and a listener on the
    updates queue, subscribed before the worker started, for what it reported."""
    listener = MemoryTransport(memory, TOPOLOGY)
    listener.subscribe(TOPOLOGY.updates)
    worker = _worker(memory, "w0")
    worker.start()
    MemoryTransport(memory, TOPOLOGY).publish(TOPOLOGY.tasks, "w0", body)
    worker.step(0.1)
    return worker, listener


@pytest.mark.timeout(60)
def test_a_worker_refuses_a_task_meant_for_another_worker_and_reports_why(
    memory: MemoryBroker,
) -> None:
    task = Task(
        "job",
        "t1",
        "w9",
        None,
        TrainingConfig(),
        GlobalModel("job", 0, MODEL, {"w": np.zeros(1, np.float32)}),
    )
    body = encode_message(task)

    worker, listener = _worker_given_task(memory, body)

    queue = TOPOLOGY.task_queue("w0")
    assert _refused_tasks(memory) == [(DeadLetter("rejected", queue, "broker"), body)]
    [failure] = _reports(listener)
    assert (failure.worker_id, failure.job_id, failure.task_id) == ("w0", "job", "t1")
    assert (failure.reason, failure.detail) == ("wrong_worker", "task is for worker 'w9'")
    assert worker.metrics.tasks_failed.labels("wrong_worker")._value.get() == 1
    assert not worker.busy


@pytest.mark.timeout(60)
def test_a_worker_refuses_an_unreadable_task_through_the_broker_and_reports_nothing(
    memory: MemoryBroker,
) -> None:
    worker, listener = _worker_given_task(memory, b"\xc1 not a task")

    queue = TOPOLOGY.task_queue("w0")
    assert _refused_tasks(memory) == [(DeadLetter("rejected", queue, "broker"), b"\xc1 not a task")]
    assert _reports(listener) == []  # it has no job or task id to report
    assert worker.metrics.tasks_failed.labels("malformed")._value.get() == 1


@pytest.mark.timeout(60)
def test_a_worker_counts_a_task_its_transport_refused_as_a_bad_chunk_set_once(
    memory: MemoryBroker,
) -> None:
    worker = _worker(memory, "w0")
    worker.start()
    parts = split_payload(bytes(3000), 1024)
    envelope = msgpack.unpackb(parts[1])
    envelope["data"] = b"\x01" + envelope["data"][1:]
    parts[1] = msgpack.packb(envelope, use_bin_type=True)
    for part in parts:
        memory.route(TOPOLOGY.tasks, "w0", part, {})

    worker.step(0.1)

    assert len(_refused_tasks(memory)) == 0  # acked envelopes: a worker may not dead-letter them
    assert worker.metrics.tasks_failed.labels("bad_chunk")._value.get() == 1
    assert not worker.busy


@pytest.mark.timeout(60)
def test_no_task_goes_out_until_min_workers_have_said_hello(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path, max_jobs=1)
    spec = _spec("fedasync", max_versions=1)
    _submit(memory, "job-1", replace(spec, strategy=replace(spec.strategy, min_workers=2)))
    first = _worker(memory, "w0")
    first.start()

    aggregator.run_until_idle()
    tasks_before_second = memory.depth(TOPOLOGY.task_queue("w0"))
    second = _worker(memory, "w1")
    threads = [_run_worker(first), _run_worker(second)]
    aggregator.run()
    for w in (first, second):
        w.stop()
    for t in threads:
        t.join(10)

    assert tasks_before_second == 0
    assert (tmp_path / "jobs" / "job-1" / "summary.json").exists()


@pytest.mark.timeout(60)
def test_a_synchronous_round_closes_on_its_deadline_when_a_worker_died_mid_training(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path, max_jobs=1)
    spec = _spec("fedavg", max_versions=2)
    spec = replace(spec, strategy=replace(spec.strategy, round_deadline_s=1.5, min_workers=2))
    _submit(memory, "job-1", spec)
    sender = MemoryTransport(memory, TOPOLOGY)
    sender.declare_worker("dead")  # says hello, takes its task, never answers
    sender.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, encode_message(Hello("dead", 64, "cpu")))
    alive = _worker(memory, "alive")
    thread = _run_worker(alive)

    aggregator.run()
    alive.stop()
    thread.join(10)

    history = [
        json.loads(line)
        for line in (tmp_path / "jobs" / "job-1" / "history.jsonl").read_text().splitlines()
    ]
    assert [h["updates"] for h in history] == [0, 1, 1]
    # Round 0 waited for the dead worker until its deadline; round 1 did not wait for it.
    assert history[1]["time_s"] >= 1.5
    assert aggregator.metrics.worker_failures.labels("missed_deadline")._value.get() == 1
    assert memory.depth(TOPOLOGY.task_queue("dead")) == 2  # one task per round, never taken
