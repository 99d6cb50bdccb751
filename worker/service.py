"""The worker service: takes the newest task, trains on local data, publishes the update."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
from torch import nn

from broker.topology import SENDER_HEADER, UPDATE_ROUTING_KEY
from broker.transport import Delivery, Transport
from shared.errors import DataMismatchError, ProtocolError, ReferenceNotAllowedError
from shared.jobs import ModelSpec
from shared.messages import (
    MAX_FAILURE_DETAIL,
    Failure,
    Hello,
    Task,
    Update,
    decode_message,
    encode_message,
)
from shared.models import buffer_names, build_model, load_numpy_state, state_to_numpy
from shared.ops import Health
from shared.tensors import Tensors
from worker.data import LocalData as LocalData
from worker.data import TrainingData
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings
from worker.training import check_fit, train

logger = logging.getLogger(__name__)
# Failures already logged at ERROR are remembered up to this many (then logged again).
MAX_REMEMBERED_FAILURES = 1000


@dataclass
class _Cycle:
    """Boundaries of one task's cycle (perf_counter seconds), for the phase metrics."""

    received: float  # the task arrived (or the last update went out, if it was queued)
    decoded: float
    issued_at: float  # the aggregator's wall clock
    marks: dict[str, float] = field(default_factory=dict)  # training-thread phase -> its end


@dataclass
class _Finished:
    """What a training thread hands back: the encoded update and its cycle."""

    body: bytes
    cycle: _Cycle


class WorkerService:
    """Polls its task queue on the service thread (which keeps the connection's heartbeats
    going) while training runs on a second thread; all broker calls stay on the service thread.
    """

    def __init__(
        self,
        transport: Transport,
        settings: WorkerSettings,
        data: TrainingData,
        device: torch.device,
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.monotonic,
        health: Health | None = None,
    ) -> None:
        self.transport = transport
        # A worker's account may not write the dead exchange (`fedq broker add-worker`): a task
        # it refuses is dead-lettered by the broker, with an x-death header naming its queue.
        transport.dead_letters_by_broker = True
        # Every task the transport refuses is counted here, once: its own (bad_properties,
        # bad_chunk, incomplete_chunks) and those _refuse hands it.
        transport.on_reject = lambda reason: metrics.tasks_failed.labels(reason).inc()
        self.settings = settings
        self.data = data
        self.device = device
        self.metrics = metrics
        self.clock = clock
        # What /healthz and the systemd watchdog read; its own clock is real, not `clock`.
        self.health = health if health is not None else Health()
        self.worker_id = settings.worker_id
        self._models: dict[ModelSpec, nn.Module] = {}
        # The fit check's verdict per model: None when the local data fits, else why not.
        self._fit: dict[ModelSpec, str | None] = {}
        self._logged_failures: set[tuple[str, str, str]] = set()
        self._pending: Task | None = None
        self._pending_cycle: _Cycle | None = None
        self._training: Future[_Finished] | None = None
        self._training_task: Task | None = None
        # When and at what wall-clock time the last update went out: the next wait starts there.
        self._published: tuple[float, float] | None = None
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
        self._await_updates_exchange()
        if self._stopping:
            return
        logger.info(
            "worker %s ready: %d samples on %s", self.worker_id, self.data.num_samples, self.device
        )
        self._hello()
        self.health.mark_ready()

    def _await_updates_exchange(self) -> None:
        """Wait (passively, without declaring it) for the exchange updates go to: a worker
        started before the aggregator waits for it instead of failing its first hello."""
        exchange = self.transport.topology.updates
        every = self.settings.wait_for_topology_s
        waited = 0
        while not self._stopping and not self.transport.exchange_exists(exchange):
            if waited % max(1, round(60 / every)) == 0:
                logger.warning(
                    "waiting for exchange %r, declared by the aggregator (or `fedq broker`): "
                    "is the aggregator running on this broker and prefix? checking every %g s",
                    exchange,
                    every,
                )
            self.health.progress(f"waiting for exchange {exchange}")
            waited += 1
            self._stopped.wait(every)
        if waited:
            logger.info("exchange %r is there; going on", exchange)

    def stop(self) -> None:
        """Ask the loop to return (safe from a signal handler)."""
        self._stopping = True
        self._stopped.set()
        self.health.mark_stopping()

    def close(self) -> None:
        """Wait for a training in progress and publish its update, then shut down."""
        if self._training is not None:
            wait([self._training])
            self._settle(time.perf_counter())
        self._executor.shutdown(wait=True)

    @property
    def busy(self) -> bool:
        """Whether a training is in progress."""
        return self._training is not None

    def step(self, timeout: float) -> None:
        """Take in tasks (keeping the newest), publish a finished update, start the next."""
        if self._training is not None and not self._training.done():
            # Wake when training ends rather than at the end of a poll: polling cost up to
            # poll_interval_s (0.5 s) per task. Tasks that came meanwhile are taken below.
            wait([self._training], timeout)
            timeout = 0.0
        delivery = self.transport.receive(timeout)
        while delivery is not None:
            self._take(delivery)
            delivery = self.transport.receive(0)
        if self._training is not None and self._training.done():
            try:
                self._settle(time.perf_counter())
            except Exception:  # a failed publish must not stop the worker
                logger.exception("task failed")
                self.metrics.tasks_failed.labels("training_error").inc()
        if self._training is None and self._pending is not None:
            task, self._pending = self._pending, None
            cycle, self._pending_cycle = self._pending_cycle, None
            # Said before training, which (slowed down, or a large model) may take long.
            logger.info(
                "job %s task %s version %d: training on worker %s%s",
                task.job_id,
                task.task_id,
                task.version,
                self.worker_id,
                f" (slowdown {self.settings.slowdown:g}x)" if self.settings.slowdown > 1 else "",
            )
            self._training = self._executor.submit(self._run_task, task, cycle)
            self._training_task = task
        if (
            self._training is None
            and self.clock() - self._last_hello >= self.settings.hello_interval_s
        ):
            self._hello()
        # Training runs on its own thread, so this loop goes round however long it takes.
        self.health.progress("training" if self._training is not None else "idle")

    # ------------------------------------------------------------------ internals

    def _settle(self, noticed: float) -> None:
        """Publish the finished training's update, or report why its task could not be trained."""
        future, task = self._training, self._training_task
        self._training, self._training_task = None, None
        if future is None or task is None:
            return
        try:
            finished = future.result()
        except Exception as e:  # a task that cannot be trained must not stop the worker
            self._report_failure(task, e)
            return
        self._publish(finished, noticed)

    def _report_failure(self, task: Task, error: Exception) -> None:
        """Tell the aggregator that this task cannot be trained (a failure message), logging
        each distinct failure once at ERROR: the same task fails the same way every time."""
        if isinstance(error, DataMismatchError):
            reason, detail = "data_mismatch", str(error)
        elif isinstance(error, ReferenceNotAllowedError):
            reason, detail = "model_not_allowed", str(error)
        else:
            reason, detail = "training_error", f"{type(error).__name__}: {error}"
        detail = detail[:MAX_FAILURE_DETAIL]
        self.metrics.tasks_failed.labels(reason).inc()
        key = (task.job_id, reason, detail)
        if key in self._logged_failures:
            logger.debug("task %s of job %s refused again: %s", task.task_id, task.job_id, detail)
        else:
            if len(self._logged_failures) >= MAX_REMEMBERED_FAILURES:
                self._logged_failures.clear()
            self._logged_failures.add(key)
            logger.error(
                "cannot train job %s (%s): %s; the aggregator is told",
                task.job_id,
                reason,
                detail,
                # A mismatch is said in full by its detail; an unexpected error needs its trace.
                exc_info=error if reason == "training_error" else None,
            )
        failure = Failure(self.worker_id, task.job_id, task.task_id, reason, detail)
        self.transport.publish(
            self.transport.topology.updates, UPDATE_ROUTING_KEY, encode_message(failure)
        )

    def _take(self, delivery: Delivery) -> None:
        received = time.perf_counter()
        self.metrics.bytes_received.inc(len(delivery.body))
        message: Task | None = None
        try:
            decoded = decode_message(delivery.body)
            if not isinstance(decoded, Task):
                raise ProtocolError(
                    f"a task queue got a {type(decoded).__name__}", "unexpected_type"
                )
            message = decoded
            if message.worker_id != self.worker_id:
                raise ProtocolError(f"task is for worker {message.worker_id!r}", "wrong_worker")
        except ProtocolError as e:
            self._refuse(delivery, e, message)
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
        self._pending_cycle = _Cycle(received, time.perf_counter(), message.issued_at)

    def _refuse(self, delivery: Delivery, error: ProtocolError, task: Task | None) -> None:
        """Refuse a task: the broker dead-letters it (x-death names this worker's queue), and
        the reason goes to the log, the metrics and, for a task it could read, the aggregator."""
        logger.warning("refusing a task from %s (%s): %s", delivery.queue, error.reason, error)
        # Counted in tasks_failed by the transport's on_reject (set in __init__).
        self.transport.reject(delivery, error.reason, str(error))
        if task is not None:
            detail = str(error)[:MAX_FAILURE_DETAIL]
            failure = Failure(self.worker_id, task.job_id, task.task_id, error.reason, detail)
            self.transport.publish(
                self.transport.topology.updates, UPDATE_ROUTING_KEY, encode_message(failure)
            )

    def _model_for(self, spec: ModelSpec) -> nn.Module:
        model = self._models.get(spec)
        if model is None:
            # A task is a message: its module:function model is imported only from the
            # operator's allowed_modules (ReferenceNotAllowedError, nothing imported).
            built = build_model(spec, allowed_modules=self.settings.allowed_modules)
            model = self._models[spec] = built.to(self.device)
        return model

    def _run_task(self, task: Task, cycle: _Cycle | None = None) -> _Finished:
        """Train one task on the training thread and return the encoded update."""
        started = time.perf_counter()
        if cycle is None:  # a task handed in directly, not taken from the queue
            cycle = _Cycle(started, started, task.issued_at)
        spec = task.model.model
        model = self._model_for(spec)
        if spec not in self._fit:
            # Once per model: one forward pass on a batch, on this worker's device.
            self._fit[spec] = check_fit(model, self.data, spec)
        problem = self._fit[spec]
        if problem is not None:
            raise DataMismatchError(problem)
        load_numpy_state(model, task.model.tensors)
        cycle.marks["load"] = time.perf_counter()
        num_samples, metrics = train(model, self.data, task.training, self._generator)
        if self.settings.slowdown > 1:
            # Emulated slowness (it stands for slower training), cut short by stop(): it must
            # not delay a shutdown.
            self._stopped.wait((self.settings.slowdown - 1) * (time.perf_counter() - started))
        cycle.marks["train"] = time.perf_counter()
        trained = state_to_numpy(model)
        if task.training.send == "delta":
            tensors = _delta(trained, task.model.tensors, buffer_names(model))
        else:
            tensors = trained
        cycle.marks["extract"] = time.perf_counter()
        metrics["duration_s"] = cycle.marks["extract"] - started
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
        body = encode_message(update)
        cycle.marks["encode"] = time.perf_counter()
        logger.info(
            "job %s version %d: trained on %d examples, loss %.4f, in %.1f s",
            task.job_id,
            task.version,
            num_samples,
            metrics["loss"],
            metrics["duration_s"],
        )
        return _Finished(body, cycle)

    def _publish(self, finished: _Finished, noticed: float) -> None:
        body = finished.body
        # The sender header says whose chunk sets these are, if the update comes in chunks.
        sender = {SENDER_HEADER: self.worker_id}
        self.transport.publish(self.transport.topology.updates, UPDATE_ROUTING_KEY, body, sender)
        published = time.perf_counter()
        self.updates_sent += 1
        self.metrics.tasks_completed.inc()
        self.metrics.bytes_sent.inc(len(body))
        self._count_phases(finished.cycle, noticed, published)
        self._published = (published, time.time())
        self._last_hello = self.clock()

    def _count_phases(self, cycle: _Cycle, noticed: float, published: float) -> None:
        """Add one cycle's phases: consecutive intervals, from the previous update's publishing
        (or this task's arrival, for the first) to this update's."""
        phases = self.metrics.phase_seconds
        start = cycle.received
        if self._published is not None:
            last, last_wall = self._published
            # A task that came while the last one trained waited for nothing.
            start = max(cycle.received, last)
            waited = start - last
            # Split at the aggregator's clock: exact on one host, off by the clock skew
            # between hosts otherwise (hence the clamping).
            by_aggregator = min(max(cycle.issued_at - last_wall, 0.0), waited)
            phases.labels("wait_aggregator").inc(by_aggregator)
            phases.labels("wait_delivery").inc(waited - by_aggregator)
        mark = max(start, cycle.decoded)
        phases.labels("decode").inc(mark - start)
        for phase in ("load", "train", "extract", "encode"):
            end = cycle.marks.get(phase, mark)
            phases.labels(phase).inc(max(0.0, end - mark))
            mark = max(mark, end)
        phases.labels("handoff").inc(max(0.0, noticed - mark))
        phases.labels("publish").inc(published - max(mark, noticed))

    def _hello(self) -> None:
        hello = Hello(self.worker_id, self.data.num_samples, str(self.device))
        self.transport.publish(
            self.transport.topology.updates, UPDATE_ROUTING_KEY, encode_message(hello)
        )
        self._last_hello = self.clock()


def _delta(trained: Tensors, base: Tensors, buffers: frozenset[str]) -> Tensors:
    """trained - base for the parameters; buffers (BatchNorm statistics, counters) and any
    non-floating tensor travel as their trained values, not differences (docs/protocol.md 5.1).
    """
    return {
        name: (a - base[name]).astype(a.dtype, copy=False)
        if a.dtype.kind == "f" and name not in buffers
        else a
        for name, a in trained.items()
    }
