"""A worker whose data does not fit the model, on the in-process broker: it refuses the task with
a failure message that names the mismatch, the aggregator counts it, stops tasking that worker
for the job and shows it in /status, and the other workers go on."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from memory_job import TOPOLOGY, aggregator, memory_worker
from prometheus_client import CollectorRegistry

import worker.service as worker_service
from broker import MemoryBroker, MemoryTransport
from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import Failure, GlobalModel, Job, Task, decode_message, encode_message
from shared.models import build_model, state_to_numpy
from worker.metrics import WorkerMetrics
from worker.service import LocalData, WorkerService
from worker.settings import WorkerSettings

MODEL = ModelSpec("mlp", (1, 8, 8), 10)
MISMATCH = "local images are 3x8x8 but the model takes 1x8x8"


def mismatched_worker(memory: MemoryBroker, worker_id: str = "bad") -> WorkerService:
    """A worker holding 3-channel 8x8 images: they do not fit the 1x8x8 model."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 8, 8, generator=generator)
    return WorkerService(
        MemoryTransport(memory, TOPOLOGY),
        WorkerSettings(worker_id=worker_id, broker="memory"),
        LocalData(x, torch.randint(0, 10, (32,), generator=generator)),
        torch.device("cpu"),
        WorkerMetrics(CollectorRegistry()),
    )


def task(task_id: str, version: int = 0) -> Task:
    model = GlobalModel("job-1", version, MODEL, state_to_numpy(build_model(MODEL, seed=0)))
    return Task("job-1", task_id, "bad", None, TrainingConfig(), model)


def updates_queue(memory: MemoryBroker) -> list[object]:
    reader = MemoryTransport(memory, TOPOLOGY)
    reader.subscribe(TOPOLOGY.updates)
    out = []
    while (delivery := reader.receive(0)) is not None:
        out.append(decode_message(delivery.body))
    return out


@pytest.mark.timeout(60)
def test_a_worker_refuses_each_task_its_data_cannot_train_and_logs_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    memory = MemoryBroker()
    MemoryTransport(memory, TOPOLOGY).declare()
    worker = mismatched_worker(memory)
    worker.start()
    sender = MemoryTransport(memory, TOPOLOGY)
    caplog.set_level(logging.DEBUG, logger="worker.service")

    for i in range(3):
        sender.publish(TOPOLOGY.tasks, "bad", encode_message(task(f"t{i}", version=i)))
        for _ in range(20):
            worker.step(0.5)
            if not worker.busy:
                break

    failures = [m for m in updates_queue(memory) if isinstance(m, Failure)]
    assert [(f.task_id, f.reason, f.detail) for f in failures] == [
        (f"t{i}", "data_mismatch", MISMATCH) for i in range(3)
    ]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert MISMATCH in errors[0].getMessage() and errors[0].exc_info is None
    assert worker.metrics.tasks_failed.labels("data_mismatch")._value.get() == 3
    assert worker.updates_sent == 0


@pytest.mark.timeout(60)
def test_a_worker_whose_training_raises_reports_a_training_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    memory = MemoryBroker()
    MemoryTransport(memory, TOPOLOGY).declare()
    worker = memory_worker(memory, "bad")
    worker.start()

    def explode(*_: object) -> None:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(worker_service, "train", explode)
    MemoryTransport(memory, TOPOLOGY).publish(TOPOLOGY.tasks, "bad", encode_message(task("t")))
    for _ in range(20):
        worker.step(0.5)
        if not worker.busy:
            break

    failures = [m for m in updates_queue(memory) if isinstance(m, Failure)]
    assert [(f.reason, f.detail) for f in failures] == [
        ("training_error", "RuntimeError: CUDA out of memory")
    ]


@pytest.mark.timeout(120)
def test_the_aggregator_counts_a_failure_stops_tasking_that_worker_and_the_job_goes_on(
    tmp_path: Path,
) -> None:
    memory = MemoryBroker()
    service = aggregator(memory, tmp_path)
    service.settings = replace(service.settings, max_jobs=1)
    good, bad = memory_worker(memory, "good"), mismatched_worker(memory)
    spec = JobSpec(
        name="t",
        model=MODEL,
        dataset="digits",
        strategy=StrategyConfig(name="fedasync", min_workers=1),
        training=TrainingConfig(batch_size=16, max_batches=2),
        stop=StopConfig(max_versions=6),
    )
    MemoryTransport(memory, TOPOLOGY).publish(
        TOPOLOGY.jobs, JOB_ROUTING_KEY, encode_message(Job("job-1", spec))
    )
    # The bad worker alone first: the job cannot end before its failure is in.
    threads = [threading.Thread(target=w.run, daemon=True) for w in (bad, good)]
    threads[0].start()

    deadline = time.monotonic() + 60
    while service._job is None or not service._job.state.failed:
        assert time.monotonic() < deadline, "no failure reached the aggregator"
        service.step(0.1)
    status = service.status()
    threads[1].start()
    service.run()
    for w in (good, bad):
        w.stop()
    for thread in threads:
        thread.join(10)

    assert status["failed_workers"] == [
        {"worker_id": "bad", "reason": "data_mismatch", "detail": MISMATCH}
    ]
    assert status["state"] == "running"
    assert service.metrics.worker_failures.labels("data_mismatch")._value.get() == 1
    assert bad.metrics.tasks_received._value.get() == 1  # no task after its failure
    assert good.updates_sent >= 6
    assert service.jobs_done == 1 and service.status()["failed_workers"] == []
    assert memory.depth(TOPOLOGY.task_queue("bad")) == 0


@pytest.mark.timeout(60)
def test_a_failure_for_no_running_job_is_acked_and_an_unknown_reason_counted_as_other(
    tmp_path: Path,
) -> None:
    memory = MemoryBroker()
    service = aggregator(memory, tmp_path)
    failure = Failure("w9", "old-job", "t1", "disk_full", "no space left on device")
    MemoryTransport(memory, TOPOLOGY).publish(
        TOPOLOGY.updates, UPDATE_ROUTING_KEY, encode_message(failure)
    )

    service.run_until_idle()

    assert service.metrics.worker_failures.labels("other")._value.get() == 1
    assert memory.depth(TOPOLOGY.updates) == 0 and memory.depth(TOPOLOGY.dead) == 0


@pytest.mark.timeout(60)
def test_a_worker_that_got_another_workers_task_is_counted_as_wrong_worker(
    tmp_path: Path,
) -> None:
    memory = MemoryBroker()
    service = aggregator(memory, tmp_path)
    failure = Failure("w0", "old-job", "t1", "wrong_worker", "task is for worker 'w9'")
    MemoryTransport(memory, TOPOLOGY).publish(
        TOPOLOGY.updates, UPDATE_ROUTING_KEY, encode_message(failure)
    )

    service.run_until_idle()

    assert service.metrics.worker_failures.labels("wrong_worker")._value.get() == 1
    assert service.metrics.worker_failures.labels("other")._value.get() == 0
