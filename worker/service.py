"""The worker service: takes the newest task, trains on local data, publishes the update."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from broker.topology import UPDATE_ROUTING_KEY
from broker.transport import Delivery, Transport
from shared.errors import ProtocolError
from shared.jobs import ModelSpec
from shared.messages import Hello, Task, Update, decode_message, encode_message
from shared.models import build_model, load_numpy_state, state_to_numpy
from shared.ops import Health
from shared.tensors import Tensors
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings
from worker.training import train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalData:
    """A worker's training examples, already on its device."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def num_samples(self) -> int:
        """How many examples the worker holds."""
        return int(self.y.shape[0])


class WorkerService:
    """Polls its task queue on the service thread (which keeps the connection's heartbeats
    going) while training runs on a second thread; all broker calls stay on the service thread.
    """

    def __init__(
        self,
        transport: Transport,
        settings: WorkerSettings,
        data: LocalData,
        device: torch.device,
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.monotonic,
        health: Health | None = None,
    ) -> None:
        self.transport = transport
        self.settings = settings
        self.data = data
        self.device = device
        self.metrics = metrics
        self.clock = clock
        # What /healthz and the systemd watchdog read; its own clock is real, not `clock`.
        self.health = health if health is not None else Health()
        self.worker_id = settings.worker_id
        self._models: dict[ModelSpec, nn.Module] = {}
        self._pending: Task | None = None
        self._training: Future[bytes] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"train-{self.worker_id}")
        self._last_hello = -float("inf")
        self._stopping = False
        self._stopped = threading.Event()
        self._generator = torch.Generator().manual_seed(settings.seed)
        self.updates_sent = 0
        metrics.device.info({"device": str(device)})

    def run(self) -> None:
        """Serve tasks until stop(); a training in progress is finished and its update sent."""
        self.start()
        while not self._stopping:
            self.step(self.settings.poll_interval_s)
        self.close()

    def start(self) -> None:
        """Declare and subscribe to this worker's task queue and say hello."""
        self.transport.declare_worker(self.worker_id)
        self.transport.subscribe(self.transport.topology.task_queue(self.worker_id))
        logger.info(
            "worker %s ready: %d samples on %s", self.worker_id, self.data.num_samples, self.device
        )
        self._hello()
        self.health.mark_ready()

    def stop(self) -> None:
        """Ask the loop to return (safe from a signal handler)."""
        self._stopping = True
        self._stopped.set()
        self.health.mark_stopping()

    def close(self) -> None:
        """Wait for a training in progress and publish its update, then shut down."""
        if self._training is not None:
            self._publish(self._training.result())
            self._training = None
        self._executor.shutdown(wait=True)

    @property
    def busy(self) -> bool:
        """Whether a training is in progress."""
        return self._training is not None

    def step(self, timeout: float) -> None:
        """Take in tasks (keeping the newest), publish a finished update, start the next."""
        delivery = self.transport.receive(timeout)
        while delivery is not None:
            self._take(delivery)
            delivery = self.transport.receive(0)
        if self._training is not None and self._training.done():
            future, self._training = self._training, None
            try:
                self._publish(future.result())
            except Exception:  # a failed task must not stop the worker
                logger.exception("task failed")
                self.metrics.tasks_failed.labels("training_error").inc()
        if self._training is None and self._pending is not None:
            task, self._pending = self._pending, None
            self._training = self._executor.submit(self._run_task, task)
        if (
            self._training is None
            and self.clock() - self._last_hello >= self.settings.hello_interval_s
        ):
            self._hello()
        # Training runs on its own thread, so this loop goes round however long it takes.
        self.health.progress("training" if self._training is not None else "idle")

    # ------------------------------------------------------------------ internals

    def _take(self, delivery: Delivery) -> None:
        self.metrics.bytes_received.inc(len(delivery.body))
        try:
            message = decode_message(delivery.body)
            if not isinstance(message, Task):
                raise ProtocolError(
                    f"a task queue got a {type(message).__name__}", "unexpected_type"
                )
            if message.worker_id != self.worker_id:
                raise ProtocolError(f"task is for worker {message.worker_id!r}", "wrong_worker")
        except ProtocolError as e:
            logger.warning("rejecting a task: %s", e)
            self.metrics.tasks_failed.labels(e.reason).inc()
            self.transport.reject(delivery, e.reason)
            return
        # Acked on receipt: training may outlast the broker's consumer timeout, and a lost
        # task is re-issued when this worker next says it is idle.
        self.transport.ack(delivery)
        self.metrics.tasks_received.inc()
        if self._pending is not None:
            self.metrics.tasks_superseded.inc()
            if (self._pending.version, self._pending.issued_at) > (
                message.version,
                message.issued_at,
            ):
                return
        self._pending = message

    def _model_for(self, spec: ModelSpec) -> nn.Module:
        model = self._models.get(spec)
        if model is None:
            model = self._models[spec] = build_model(spec).to(self.device)
        return model

    def _run_task(self, task: Task) -> bytes:
        """Train one task on the training thread and return the encoded update."""
        started = time.perf_counter()
        model = self._model_for(task.model.model)
        load_numpy_state(model, task.model.tensors)
        num_samples, metrics = train(
            model, self.data.x, self.data.y, task.training, self._generator
        )
        trained = state_to_numpy(model)
        tensors = _delta(trained, task.model.tensors) if task.training.send == "delta" else trained
        if self.settings.slowdown > 1:
            # Emulated slowness, cut short by stop(): it must not delay a shutdown.
            self._stopped.wait((self.settings.slowdown - 1) * (time.perf_counter() - started))
        metrics["duration_s"] = time.perf_counter() - started
        self.metrics.training_duration.observe(metrics["duration_s"])
        self.metrics.samples_trained.inc(num_samples)
        self.metrics.last_loss.set(metrics["loss"])
        self.metrics.last_accuracy.set(metrics["accuracy"])
        update = Update(
            job_id=task.job_id,
            update_id=uuid.uuid4().hex,
            worker_id=self.worker_id,
            task_id=task.task_id,
            base_version=task.version,
            round=task.round,
            kind=task.training.send,
            num_samples=self.data.num_samples,
            tensors=tensors,
            metrics=metrics,
        )
        return encode_message(update)

    def _publish(self, body: bytes) -> None:
        self.transport.publish(self.transport.topology.updates, UPDATE_ROUTING_KEY, body)
        self.updates_sent += 1
        self.metrics.tasks_completed.inc()
        self.metrics.bytes_sent.inc(len(body))
        self._last_hello = self.clock()

    def _hello(self) -> None:
        hello = Hello(self.worker_id, self.data.num_samples, str(self.device))
        self.transport.publish(
            self.transport.topology.updates, UPDATE_ROUTING_KEY, encode_message(hello)
        )
        self._last_hello = self.clock()


def _delta(trained: Tensors, base: Tensors) -> Tensors:
    """trained - base for floating tensors; integer buffers travel as values, not differences."""
    return {
        name: (a - base[name]).astype(a.dtype, copy=False) if a.dtype.kind == "f" else a
        for name, a in trained.items()
    }
