"""A FedBuff job of the 2NN on the in-process broker, for tests that drive the services
message by message: the broker with the job and a worker's hello queued, the aggregator, a
worker service, updates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from known_task_key import task_id as issued_task_id
from known_task_key import use_known_key
from prometheus_client import CollectorRegistry

from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker import MemoryBroker, MemoryTransport, Topology
from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY, read_dead_letter
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig
from shared.messages import Hello, Job, Task, Update, decode_message, encode_message
from shared.models import build_model, state_to_numpy
from worker.metrics import WorkerMetrics
from worker.service import LocalData, WorkerService
from worker.settings import WorkerSettings

TOPOLOGY = Topology("fedq")
MODEL = ModelSpec("mlp", (1, 8, 8), 10)
SHAPES = state_to_numpy(build_model(MODEL, seed=0))
JOB_ID = "job-1"


def fedbuff_spec(buffer_size: int, max_versions: int) -> JobSpec:
    """FedBuff with K = buffer_size on the digits, stopping at max_versions."""
    return JobSpec(
        name="t",
        model=MODEL,
        dataset="digits",
        strategy=StrategyConfig(name="fedbuff", buffer_size=buffer_size),
        stop=StopConfig(max_versions=max_versions),
    )


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def aggregator(
    memory: MemoryBroker,
    state_dir: Path,
    known_key: bool = True,
    clock: Callable[[], float] = time.monotonic,
    registry: CollectorRegistry | None = None,
    **settings: Any,
) -> AggregatorService:
    """An aggregator on the broker, subscribed to jobs and updates, not yet stepped, with the
    tests' known task key (else its own), its metrics in `registry` (else a fresh one);
    `settings` are AggregatorSettings fields."""
    if known_key:
        use_known_key(state_dir)
    service = AggregatorService(
        MemoryTransport(memory, TOPOLOGY),
        AggregatorSettings(broker="memory", state_dir=str(state_dir), **settings),
        AggregatorMetrics(registry if registry is not None else CollectorRegistry()),
        clock=clock,
    )
    service.transport.declare()
    service.transport.subscribe(TOPOLOGY.jobs)
    service.transport.subscribe(TOPOLOGY.updates)
    return service


def broker_with_job(spec: JobSpec) -> tuple[MemoryBroker, MemoryTransport]:
    """A broker holding the job and worker w0's hello, and a transport to send with."""
    memory = MemoryBroker()
    sender = MemoryTransport(memory, TOPOLOGY)
    sender.declare()
    sender.declare_worker("w0")
    sender.publish(TOPOLOGY.jobs, JOB_ROUTING_KEY, encode_message(Job(JOB_ID, spec)))
    sender.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, encode_message(Hello("w0", 10, "cpu")))
    return memory, sender


def send_delta(
    sender: MemoryTransport, update_id: str, base: int, value: float, task_id: str | None = None
) -> None:
    """Publish w0's FedBuff update: every parameter moved by `value`, answering `task_id` (by
    default a new task of version `base`, issued under the known key)."""
    task_id = task_id if task_id is not None else issued_task_id(JOB_ID, "w0", base)
    tensors = {name: np.full(a.shape, value, a.dtype) for name, a in SHAPES.items()}
    update = Update(JOB_ID, update_id, "w0", task_id, base, None, "delta", 10, tensors,
                    {"loss": 1.0}, sent_at=0.0)  # fmt: skip
    sender.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, encode_message(update))


def tasks_sent(memory: MemoryBroker, worker_id: str = "w0") -> list[Task]:
    """Every task waiting in a worker's queue, taken off it and decoded."""
    reader = MemoryTransport(memory, TOPOLOGY)
    reader.subscribe(TOPOLOGY.task_queue(worker_id))
    tasks = []
    while (delivery := reader.receive(0)) is not None:
        message = decode_message(delivery.body)
        assert isinstance(message, Task)
        tasks.append(message)
        reader.ack(delivery)
    return tasks


def answer(sender: MemoryTransport, task: Task, update_id: str, value: float = 0.01) -> Update:
    """Publish the update a worker sends for `task` (every parameter moved by `value`, as a
    delta or as weights, as the task asks); return it."""
    model = task.model.tensors
    moved = {name: (a + np.asarray(value, a.dtype)).astype(a.dtype) for name, a in model.items()}
    if task.training.send == "delta":
        moved = {name: np.full(a.shape, value, a.dtype) for name, a in model.items()}
    update = Update(
        task.job_id,
        update_id,
        task.worker_id,
        task.task_id,
        task.version,
        task.round,
        task.training.send,
        10,
        moved,
        {"loss": 1.0},
        sent_at=0.0,
    )
    sender.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, encode_message(update))
    return update


def dead_letters(memory: MemoryBroker) -> list[tuple[str, bytes]]:
    """(reason, body) of every message on the dead queue so far, taken off it: a service's
    x-fedq-reason, or the broker's x-death reason ("rejected") for a worker's refused task."""
    reader = MemoryTransport(memory, TOPOLOGY)
    reader.subscribe(TOPOLOGY.dead)
    taken = []
    while (delivery := reader.receive(0)) is not None:
        taken.append((read_dead_letter(delivery.headers).reason, delivery.body))
        reader.ack(delivery)
    return taken


def read_history(state_dir: Path) -> list[dict]:
    """The job's history.jsonl lines (none if it is not there yet)."""
    path = state_dir / "jobs" / JOB_ID / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def memory_worker(memory: MemoryBroker, worker_id: str = "w0", **settings: Any) -> WorkerService:
    """A worker service on the broker with 64 random 8x8 samples (seeded), not yet started;
    `settings` are WorkerSettings fields (slowdown, poll_interval_s, ...)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (64,), generator=generator)
    return WorkerService(
        MemoryTransport(memory, TOPOLOGY),
        WorkerSettings(worker_id=worker_id, broker="memory", **settings),
        LocalData(x, y),
        torch.device("cpu"),
        WorkerMetrics(CollectorRegistry()),
    )
