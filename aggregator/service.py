"""The aggregator service: takes jobs from the queue, folds updates in, publishes new versions."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from aggregator.checkpoint import CheckpointStore
from aggregator.evaluation import BackgroundEvaluator, Evaluation, Evaluator
from aggregator.metrics import FAILURE_REASONS, AggregatorMetrics
from aggregator.outcomes import CANCELLED, JobOutcomes
from aggregator.output import BEST_MODEL_FILE, MODEL_FILE, RunDirectory
from aggregator.settings import AggregatorSettings
from aggregator.state import Accepted, JobState, WorkerRegistry
from aggregator.tasks import load_task_key
from broker.spool import ChunkSpool
from broker.transport import Delivery, Transport
from shared.chunks import Reassembler
from shared.errors import FedqError, ProtocolError, TransportError, UnroutableError
from shared.jobs import TrainingConfig, to_dict
from shared.messages import (
    Cancel,
    Failure,
    GlobalModel,
    Hello,
    Job,
    Task,
    Update,
    decode_message,
    encode_message,
)
from shared.models import buffer_names, build_model, state_to_numpy
from shared.ops import Health
from shared.shapes import complete_job
from shared.tensors import first_nonfinite

logger = logging.getLogger(__name__)

# With stall_after_s = 0, a job is stalled after max(this, 3 x round_deadline_s) without a version.
STALL_AFTER_MIN_S = 300.0


@dataclass
class JobFigures:
    """The service's own figures of a job (its state machine keeps the rest): kept in its
    checkpoints under these names, and read by its summary, its status and its tasks."""

    last_evaluated: int | None = None
    best_accuracy: float = 0.0
    # The version saved as model-best.safetensors (None until an evaluation succeeded).
    best_version: int | None = None
    last_accuracy: float | None = None
    last_loss: float | None = None
    time_to_target_s: float | None = None
    bytes_received: int = 0
    bytes_sent: int = 0
    # Updates of candidate versions discarded as not finite (rejections.jsonl's
    # version_not_finite); checkpointed with the state that no longer holds them.
    updates_discarded: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The figures as a checkpoint keeps them."""
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> JobFigures:
        """The figures a checkpoint kept; one an older checkpoint lacks (last_evaluated,
        best_version, updates_discarded) takes its default, and other keys are not figures."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in saved:
                value, default = saved[f.name], f.default
                # A figure whose default is a number is taken as that number's type.
                if isinstance(default, (int, float)):
                    value = type(default)(value)
                values[f.name] = value
        return cls(**values)


@dataclass
class _Running:
    """The job being trained, with what the service holds for it besides the state machine."""

    job: Job
    delivery: Delivery
    state: JobState
    evaluator: BackgroundEvaluator
    output: RunDirectory
    checkpoints: CheckpointStore
    # Accepted updates are acked only once a checkpoint that includes them is on disk.
    unacked: list[Delivery] = field(default_factory=list)
    unacked_since: float = 0.0
    # Tasks go out once strategy.min_workers workers are alive.
    dispatching: bool = False
    # History lines wait here, in version order, while their version is being evaluated.
    unwritten: deque[dict[str, Any]] = field(default_factory=deque)
    awaiting: set[int] = field(default_factory=set)
    figures: JobFigures = field(default_factory=JobFigures)
    # A job that cannot progress (docs/monitoring.md, "Jobs that cannot progress"): when the
    # newest version appeared, why the job is stalled (None while it is not), why its global
    # model is unusable (it then ends as `diverged`), and how many evaluations were not finite.
    last_version_at: float = 0.0
    stalled: str | None = None
    diverged: str | None = None
    evaluations_nonfinite: int = 0
    # A stop reason the service decided on (an operator's cancel), ahead of the stop rules,
    # and what job-outcomes.jsonl says about it.
    stop_requested: str | None = None
    stop_detail: str = ""


class AggregatorService:
    """Runs jobs one at a time in queue order; see docs/architecture.md for the message flow."""

    def __init__(
        self,
        transport: Transport,
        settings: AggregatorSettings,
        metrics: AggregatorMetrics,
        clock: Callable[[], float] = time.monotonic,
        health: Health | None = None,
    ) -> None:
        self.transport = transport
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        # What /healthz and the systemd watchdog read; its own clock is real, not `clock`.
        self.health = health if health is not None else Health()
        self._gauges_at = -float("inf")
        self.transport.on_reject = lambda reason: metrics.updates_rejected.labels(reason).inc()
        # Chunk envelopes are acked once spooled: a set larger than the prefetch cannot stall.
        self.transport.hold_chunks(
            Reassembler(
                max_pending_bytes=settings.max_chunk_pending_bytes,
                max_age_s=settings.chunk_max_age_s,
                max_sets=settings.max_chunk_sets,
                max_set_bytes=settings.max_message_bytes,
                max_sets_per_sender=settings.max_chunk_sets_per_sender,
                max_bytes_per_sender=settings.max_chunk_pending_bytes_per_sender,
                idle_s=settings.chunk_idle_s,
            ),
            ChunkSpool(Path(settings.state_dir) / "chunks"),
            validated_senders=settings.require_user_id,
        )
        self._stopping = False
        self._job: _Running | None = None
        self._queued_jobs: deque[tuple[Job, Delivery]] = deque()
        # Durable, so that a restarted aggregator rejects late updates as job_finished.
        self._outcomes = JobOutcomes(Path(settings.state_dir))
        # Signs task ids; kept in the state directory so that a restart still knows its tasks.
        self._task_key = load_task_key(Path(settings.state_dir))
        # The workers' hellos, while idle and across jobs: each job's state reads them.
        self._workers = WorkerRegistry()
        self.jobs_done = 0

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        """Serve until stop() or, in burst mode, until max_jobs jobs are done."""
        t = self.transport
        t.declare()
        t.subscribe(t.topology.jobs)
        t.subscribe(t.topology.updates)
        logger.info("aggregator ready on %s", t.topology.prefix)
        self.health.mark_ready()
        while not self._stopping:
            self.step(self.settings.poll_interval_s)
            if self.settings.max_jobs and self.jobs_done >= self.settings.max_jobs:
                break

    def stop(self) -> None:
        """Ask the loop to return after the current step (safe from a signal handler)."""
        self._stopping = True
        self.health.mark_stopping()

    def step(self, timeout: float) -> bool:
        """Handle at most one message and the clock's consequences; return whether one came."""
        delivery = self.transport.receive(timeout)
        if delivery is not None:
            try:
                self._handle(delivery)
            except TransportError:
                raise
            except Exception:  # the loop's edge: one bad message must not stop the service
                logger.exception("failed to handle a message from %s", delivery.queue)
                self.transport.reject(delivery, "internal_error")
        self._tick()
        self._note_progress()
        return delivery is not None

    def run_until_idle(self, idle_s: float = 0.2) -> None:
        """Process messages until none arrives for idle_s and no evaluation is pending (tests)."""
        while True:
            while self.step(idle_s):
                pass
            running = self._job
            if running is None or not running.awaiting:
                return
            self._apply_evaluations(running, running.evaluator.wait())

    def _note_progress(self) -> None:
        """Tell the health check the loop went round; refresh the status and workers gauge."""
        now = self.clock()
        if now - self._gauges_at < 1.0:
            self.health.progress()
            return
        self._gauges_at = now
        sets, held = self.transport.chunk_backlog()
        self.metrics.chunk_sets_pending.set(sets)
        self.metrics.chunk_pending_bytes.set(held)
        running = self._job
        if running is not None:
            active = len(running.state.alive_workers(now))
            status = f"job {running.job.job_id}: version {running.state.version}"
            if running.stalled is not None:
                status += " (stalled)"
        else:
            active = self._workers.active(now, self.settings.worker_timeout_s)
            status = "idle: waiting for a job"
        # Set here as well as on dispatch: workers that went silent must drop out of the gauge.
        self.metrics.workers_active.set(active)
        self.health.progress(f"{status}, {active} workers active")

    def status(self) -> dict[str, Any]:
        """What `fedq status` shows, for the /status endpoint (read from the HTTP thread)."""
        running = self._job
        queued = [job.job_id for job, _ in list(self._queued_jobs)]
        out: dict[str, Any] = {
            "state": "idle" if running is None else "running",
            "job_id": None,
            "strategy": None,
            "model": None,
            "version": None,
            "round": None,
            "accuracy": None,
            "loss": None,
            "best_accuracy": None,
            "updates_accepted": None,
            "updates_held": 0,
            "stalled": False,
            "stall_reason": None,
            "diverged": None,
            "evaluations_nonfinite": 0,
            "queued_jobs": len(queued),
            "queued_job_ids": queued,
            "jobs_done": self.jobs_done,
            # Ended jobs of the state dir: how many finished, failed and were cancelled.
            "jobs_ended": self._outcomes.counts(),
            "failed_jobs": self._outcomes.failed(),
            "failed_workers": [],
        }
        if running is not None:
            state, spec = running.state, running.job.spec
            out |= {
                "job_id": running.job.job_id,
                "strategy": spec.strategy.name,
                "model": spec.model.name,
                "version": state.version,
                "round": state.round,
                "accuracy": running.figures.last_accuracy,
                "loss": running.figures.last_loss,
                "best_accuracy": running.figures.best_accuracy,
                "updates_accepted": state.accepted,
                # Accepted, not yet acked: they wait for the next checkpoint.
                "updates_held": len(running.unacked),
                "stalled": running.stalled is not None,
                "stall_reason": running.stalled,
                "diverged": running.diverged,
                "evaluations_nonfinite": running.evaluations_nonfinite,
                "failed_workers": [
                    {"worker_id": w, "reason": reason, "detail": detail}
                    for w, (reason, detail) in sorted(state.failed.items())
                ],
            }
        return out

    # ------------------------------------------------------------------ messages

    def _handle(self, delivery: Delivery) -> None:
        size, limit = len(delivery.body), self.settings.max_message_bytes
        if size > limit:
            # Not decoded at all: unpacking would hold another copy of a body this large.
            detail = f"{size} bytes exceed max_message_bytes {limit}"
            logger.warning("rejecting a message from %s (too_large): %s", delivery.queue, detail)
            self.transport.reject(delivery, "too_large", detail)
            return
        try:
            message = decode_message(delivery.body)
        except ProtocolError as e:
            logger.warning("rejecting a message from %s (%s): %s", delivery.queue, e.reason, e)
            self.transport.reject(delivery, e.reason, str(e))
            return
        if isinstance(message, (Job, Cancel)) and delivery.queue != self.transport.topology.jobs:
            # Only accounts allowed to write the jobs exchange may submit or cancel jobs.
            logger.warning("rejecting a %s from %s", type(message).__name__, delivery.queue)
            self.transport.reject(delivery, "unexpected_type", f"not on {delivery.queue}")
        elif isinstance(message, (Job, Cancel)) and self._refuses_submitter(message, delivery):
            return
        elif isinstance(message, Job):
            logger.info("job %s queued (%s)", message.job_id, message.spec.strategy.name)
            self._queued_jobs.append((message, delivery))
        elif isinstance(message, Cancel):
            self._on_cancel(message, delivery)
        elif isinstance(message, Hello):
            self._on_hello(message, delivery)
        elif isinstance(message, Update):
            self._on_update(message, delivery)
        elif isinstance(message, Failure):
            self._on_failure(message, delivery)
        else:
            self.transport.reject(delivery, "unexpected_type")

    def _refuses_submitter(self, message: Job | Cancel, delivery: Delivery) -> bool:
        """Dead-letter (and say so) a job or cancel that is not attributable to a submitter:
        without a broker-validated user_id when require_user_id or job_submitters asks for one
        (`unattributed`), or from a user not in job_submitters (`not_a_submitter`)."""
        user, submitters = delivery.user_id, self.settings.job_submitters
        what = f"{type(message).__name__.lower()} of job {message.job_id}"
        if user is None and (self.settings.require_user_id or submitters):
            reason, detail = "unattributed", f"a {what} without a broker-validated user_id"
        elif submitters and user not in submitters:
            reason, detail = "not_a_submitter", f"user {user!r} is not in job_submitters"
        else:
            return False
        logger.warning("rejecting a %s (%s): %s", what, reason, detail)
        self.transport.reject(delivery, reason, detail)
        return True

    def _claims_another_user(self, worker_id: str, delivery: Delivery, what: str) -> str | None:
        """With require_user_id, dead-letter (and say so) a message in a worker's name that was
        not published by that worker's broker user: a hello in another site's name would take
        its tasks, an update or a failure would speak for it. Returns the rejection's detail, or
        None when the message may go on."""
        if not self.settings.require_user_id or delivery.user_id == worker_id:
            return None
        detail = f"worker {worker_id!r} published as user {delivery.user_id!r}"
        logger.warning("rejecting %s (user_mismatch): %s", what, detail)
        self.transport.reject(delivery, "user_mismatch", detail)
        return detail

    def _on_hello(self, hello: Hello, delivery: Delivery) -> None:
        if self._claims_another_user(hello.worker_id, delivery, "a hello"):
            return
        self.transport.ack(delivery)
        now = self.clock()
        self._workers.note_hello(hello.worker_id, now)
        if self._job is not None:
            self._job.state.note_idle(hello.worker_id, now)

    def _on_failure(self, failure: Failure, delivery: Delivery) -> None:
        """A worker cannot train a task: count it, and send that worker no more tasks for the
        job (else it would fail every task of it). The next job starts with a clean slate."""
        if self._claims_another_user(failure.worker_id, delivery, "a failure report"):
            return
        reason = failure.reason if failure.reason in FAILURE_REASONS else "other"
        self.metrics.worker_failures.labels(reason).inc()
        running = self._job
        if running is not None and failure.job_id == running.job.job_id:
            first = running.state.note_failure(
                failure.worker_id, failure.task_id, failure.reason, failure.detail
            )
            if first:
                logger.warning(
                    "worker %s cannot train job %s (%s): %s; it gets no more tasks for this job",
                    failure.worker_id,
                    failure.job_id,
                    failure.reason,
                    failure.detail,
                )
        else:
            logger.info(
                "worker %s reported a failure for job %s, which is not running",
                failure.worker_id,
                failure.job_id,
            )
        self.transport.ack(delivery)

    def _on_update(self, update: Update, delivery: Delivery) -> None:
        self.metrics.updates_received.inc()
        self.metrics.update_size.observe(len(delivery.body))
        mismatch = self._claims_another_user(
            update.worker_id, delivery, f"update {update.update_id}"
        )
        running = self._job
        if mismatch is not None:
            if running is not None and update.job_id == running.job.job_id:
                # Accounted for in the job as every other rejected update is. Its update_id is
                # not remembered: it may be the named site's own, which must still be taken.
                running.state.count_rejection("user_mismatch")
                running.output.append_rejection(_rejection(update, "user_mismatch", mismatch))
            return
        if running is None or update.job_id != running.job.job_id:
            ended = self._outcomes.get(update.job_id)
            reason = "unknown_job" if ended is None else "job_finished"
            detail = f"job {update.job_id!r} is not running"
            logger.warning("rejecting update %s: %s", update.update_id, reason)
            if ended is not None:
                # Stragglers of an ended job are accounted for in its run directory too.
                detail = f"job {update.job_id!r} ended ({ended.stop_reason}) before it came"
                run = RunDirectory(self._output_dir(update.job_id))
                run.append_rejection(_rejection(update, reason, detail))
            self.transport.reject(delivery, reason, detail)
            return
        running.figures.bytes_received += len(delivery.body)
        self.metrics.bytes_received.inc(len(delivery.body))
        started = time.perf_counter()
        outcome = running.state.offer(update, self.clock())
        if not isinstance(outcome, Accepted):
            logger.warning(
                "rejecting update %s (%s): %s", update.update_id, outcome.reason, outcome.detail
            )
            running.output.append_rejection(_rejection(update, outcome.reason, outcome.detail))
            self.transport.reject(delivery, outcome.reason, outcome.detail)
            return
        self.metrics.updates_accepted.inc()
        self.metrics.staleness.observe(outcome.staleness)
        if not running.unacked:
            running.unacked_since = self.clock()
        # Only its handles are needed to ack it: the body (a model's worth) is let go now.
        running.unacked.append(replace(delivery, body=b""))
        self._note_discarded(running)
        if outcome.new_version is not None:
            self._on_new_version(running)
        self.metrics.aggregation_duration.observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ jobs

    def _tick(self) -> None:
        running = self._job
        if running is None:
            if self._queued_jobs:
                job, delivery = self._queued_jobs.popleft()
                try:
                    self._start(job, delivery)
                except TransportError:
                    raise
                except Exception as e:  # a job that cannot start is rejected, not fatal
                    detail = f"{type(e).__name__}: {e}"
                    if isinstance(e, FedqError):
                        # An expected refusal (a reference not allowed, a model or data set that
                        # is not there, a bad setting): its reason says it all.
                        logger.warning("job %s cannot start: %s", job.job_id, detail)
                    else:
                        logger.exception("job %s cannot start", job.job_id)
                    self._job = None
                    self.metrics.job_running.set(0)
                    self._end_unstarted(job, delivery, "bad_job", detail)
            return
        self._apply_evaluations(running, running.evaluator.poll())
        now = self.clock()
        self._check_stalled(running, now)
        if running.unacked and (
            len(running.unacked) >= self.settings.checkpoint_every_updates
            or now - running.unacked_since >= self.settings.checkpoint_interval_s
        ):
            self._checkpoint(running)
        new_version = running.state.check_deadline(now)
        self._note_discarded(running)
        if new_version is not None:
            self._on_new_version(running)
        elif self._stop_reason(running) is not None:
            self._finish(running)
        if self._job is not None:
            self._dispatch(running)

    def _output_dir(self, job_id: str) -> Path:
        return Path(self.settings.output_dir or Path(self.settings.state_dir) / "jobs" / job_id)

    def _end_unstarted(self, job: Job, delivery: Delivery, reason: str, detail: str) -> None:
        """End a job that never ran: record its outcome, then settle its message."""
        self._outcomes.record(job.job_id, reason, detail, submitted_by=delivery.user_id)
        self.jobs_done += 1
        if reason == CANCELLED:
            self.transport.ack(delivery)
        else:
            self.transport.reject(delivery, reason, detail)

    def _on_cancel(self, cancel: Cancel, delivery: Delivery) -> None:
        """End the job a cancel names, running or queued, as `cancelled`; then ack the cancel."""
        running = self._job
        if running is not None and running.job.job_id == cancel.job_id:
            logger.info("job %s cancelled at version %d", cancel.job_id, running.state.version)
            running.stop_requested = CANCELLED
            running.stop_detail = f"cancelled at version {running.state.version}"
            self._finish(running)
            self.transport.ack(delivery)
            return
        for queued in list(self._queued_jobs):
            if queued[0].job_id == cancel.job_id:
                logger.info("job %s cancelled before it started", cancel.job_id)
                self._queued_jobs.remove(queued)
                self._end_unstarted(*queued, CANCELLED, "cancelled before it started")
                self.transport.ack(delivery)
                return
        reason = "unknown_job" if cancel.job_id not in self._outcomes else "job_finished"
        detail = f"cancel: job {cancel.job_id!r} is neither running nor queued"
        logger.warning("rejecting a cancel: %s (%s)", detail, reason)
        self.transport.reject(delivery, reason, detail)

    def _start(self, job: Job, delivery: Delivery) -> None:
        ended = self._outcomes.get(job.job_id)
        if ended is not None and ended.outcome == CANCELLED:
            # Cancelled while queued, and redelivered because a crash took the ack away.
            logger.info("job %s was cancelled; acknowledging it", job.job_id)
            self.jobs_done += 1
            self.transport.ack(delivery)
            return
        output_dir = self._output_dir(job.job_id)
        summary_path = output_dir / "summary.json"
        if summary_path.exists():
            # Finished before a crash took the ack away: finishing again would change nothing.
            logger.info("job %s already finished; acknowledging it", job.job_id)
            reason = json.loads(summary_path.read_text(encoding="utf-8"))["stop_reason"]
            self._outcomes.record(job.job_id, reason, submitted_by=delivery.user_id)
            self.jobs_done += 1
            self.transport.ack(delivery)
            return
        # What the job leaves out of its model's shape comes from its evaluation data.
        # A module:function model or data set is imported only from allowed_modules: a job is a
        # message, and must not choose what code the aggregator runs.
        allowed = self.settings.allowed_modules
        job = replace(job, spec=complete_job(job.spec, allowed_modules=allowed))
        spec = job.spec
        built = build_model(spec.model, seed=spec.seed, allowed_modules=allowed)
        initial = state_to_numpy(built)
        evaluator = BackgroundEvaluator(
            Evaluator(
                spec.model,
                spec.dataset,
                self.settings.eval_batch_size,
                self.settings.eval_device,
                allowed,
            )
        )
        # The job's clock starts once its set-up is done, as a centralised run's would.
        state = JobState(
            job,
            initial,
            self.clock(),
            self.settings.worker_timeout_s,
            buffer_names(built),
            task_key=self._task_key,
            registry=self._workers,
        )
        store = CheckpointStore(output_dir / "checkpoints")
        running = _Running(job, delivery, state, evaluator, RunDirectory(output_dir), store)
        running.last_version_at = self.clock()
        self._job = running
        self.metrics.job_running.set(1)
        resumed = store.load_latest()
        if resumed is not None:
            snap, figures = resumed
            state.restore(snap, self.clock())
            _restore_figures(running, figures)
            running.output.truncate_history(state.version)
            # Versions the checkpoint covers whose lines were still waiting for an evaluation.
            written = running.output.last_history_version()
            for record in figures.get("unwritten_history", []):
                if written is None or record["version"] > written:
                    running.output.append_history(record)
            logger.info("job %s resumed at version %d", job.job_id, state.version)
            self._check_model(running)  # a crash may have come between a divergence and its end
        else:
            logger.info(
                "job %s started: %s, model %s", job.job_id, spec.strategy.name, spec.model.name
            )
            self._record_version(running)
            self._checkpoint(running)
        # Updates a previous run left half-received or unsettled in the chunk spool come back
        # now that their job runs (receiving them earlier would reject them as unknown_job).
        self.transport.resume_spool()
        self._dispatch(running)

    def _dispatch(self, running: _Running) -> None:
        state = running.state
        now = self.clock()
        if running.diverged is not None:
            return  # never hand out a model that holds NaN or Inf; the job ends at the next tick
        if not running.dispatching:
            if len(state.alive_workers(now)) < running.job.spec.strategy.min_workers:
                return
            running.dispatching = True
            if state.version == 0 and state.accepted == 0:
                # A fresh job's clock starts when its workers are there, as a centralised
                # run's starts when its data is loaded.
                state.started_at = now
        workers = state.workers_to_task(now)
        if not workers:
            return
        training = _training_for(running.job, state.update_kind)
        model = GlobalModel(
            running.job.job_id,
            state.version,
            running.job.spec.model,
            state.model,
            _version_metrics(running),
        )
        for worker_id in workers:
            task = Task(
                job_id=running.job.job_id,
                task_id=state.new_task_id(worker_id),
                worker_id=worker_id,
                round=state.round,
                training=training,
                model=model,
            )
            body = encode_message(task)
            try:
                self.transport.publish(self.transport.topology.tasks, worker_id, body)
            except UnroutableError as e:
                # A fact about that worker (a hello from an id with no task queue, or a queue
                # deleted), not about the service: it is left out of this job.
                self._no_task_queue(running, worker_id, str(e))
                continue
            running.figures.bytes_sent += len(body)
            self.metrics.bytes_sent.inc(len(body))
            state.note_task(worker_id, task.task_id, now)
        self.metrics.workers_active.set(len(state.alive_workers(now)))

    def _no_task_queue(self, running: _Running, worker_id: str, detail: str) -> None:
        """A task to this worker was unroutable: count it, task it no more for this job."""
        self.metrics.worker_failures.labels("no_task_queue").inc()
        if running.state.note_failure(worker_id, "", "no_task_queue", detail):
            logger.warning(
                "worker %s has no task queue (%s); it gets no more tasks for job %s",
                worker_id,
                detail,
                running.job.job_id,
            )

    def _note_missed_deadlines(self, running: _Running) -> None:
        """Count (and log once) each worker whose task passed a round's deadline unanswered:
        later rounds do not wait for it until it sends an update."""
        for worker_id in running.state.take_missed_deadline():
            self.metrics.worker_failures.labels("missed_deadline").inc()
            logger.warning(
                "worker %s let its task pass the deadline of round %d; rounds of job %s do not "
                "wait for it until it sends an update",
                worker_id,
                (running.state.round or 1) - 1,
                running.job.job_id,
            )

    def _checkpoint(self, running: _Running) -> None:
        """Make the state durable, then ack every update it includes."""
        figures = running.figures.to_dict() | {"unwritten_history": list(running.unwritten)}
        snap = running.state.snapshot(self.clock())
        running.checkpoints.save(running.job.job_id, snap, figures)
        for delivery in running.unacked:
            self.transport.ack(delivery)
        running.unacked.clear()

    def _on_new_version(self, running: _Running) -> None:
        self._note_missed_deadlines(running)
        self._record_version(running)
        self._checkpoint(running)
        if self._stop_reason(running) is not None:
            self._finish(running)
        else:
            self._dispatch(running)

    def _record_version(self, running: _Running) -> None:
        """Write the new version's history line, once its evaluation (if any) is in.

        The version exists from here: evaluating it is not part of producing it, so it is
        evaluated in the background while updates keep coming and tasks go out.
        """
        state = running.state
        record = state.last_record
        time_s = self.clock() - state.started_at
        self._note_version(running)
        self.metrics.model_version.set(state.version)
        self.metrics.round.set(state.round or 0)
        self.metrics.last_model_timestamp.set(time.time())
        running.unwritten.append(
            {
                "version": state.version,
                "round": record.round if record else state.round,
                "time_s": round(time_s, 4),
                "accuracy": None,
                "loss": None,
                "train_loss": record.train_loss if record else None,
                "updates": len(record.update_ids) if record else 0,
                "update_ids": record.update_ids if record else [],
                "mean_staleness": record.mean_staleness if record else 0.0,
                "max_staleness": max(record.staleness, default=0) if record else 0,
                "staleness": list(record.staleness) if record else [],
                "updates_accepted": state.accepted,
                "updates_rejected": sum(state.rejected.values()),
            }
        )
        final = self._stop_reason(running) is not None
        due = state.version % running.job.spec.eval_every == 0 or final
        # A diverged version is not evaluated: a NaN score would add nothing to its warning.
        if due and running.diverged is None:
            skipped = running.evaluator.submit(state.version, state.model)
            if skipped is not None:
                running.awaiting.discard(skipped)
                self.metrics.evaluations_skipped.inc()
            running.awaiting.add(state.version)
        self._write_history(running)

    def _apply_evaluations(self, running: _Running, evaluations: list[Evaluation]) -> None:
        """Take finished evaluations into the figures, the metrics and the waiting lines."""
        figures = running.figures
        for evaluation in evaluations:
            version = evaluation.version
            running.awaiting.discard(version)
            self.metrics.evaluation_duration.observe(evaluation.seconds)
            if evaluation.accuracy is None or evaluation.loss is None:
                continue
            accuracy, loss = evaluation.accuracy, evaluation.loss
            if not (math.isfinite(accuracy) and math.isfinite(loss)):
                self._note_nonfinite_evaluation(running, version, accuracy, loss)
                continue
            figures.last_evaluated = version
            figures.last_accuracy, figures.last_loss = accuracy, loss
            if figures.best_version is None or accuracy > figures.best_accuracy:
                self._save_best(running, evaluation)
            self.metrics.eval_accuracy.set(accuracy)
            self.metrics.eval_loss.set(loss)
            target = running.job.spec.stop.target_accuracy
            for record in running.unwritten:
                if record["version"] != version:
                    continue
                record["accuracy"], record["loss"] = accuracy, loss
                # The time of the version, not of its evaluation, which came later.
                reached = target is not None and accuracy >= target
                if reached and figures.time_to_target_s is None:
                    figures.time_to_target_s = record["time_s"]
        self._write_history(running)

    def _save_best(self, running: _Running, evaluation: Evaluation) -> None:
        """Write the evaluated tensors as model-best.safetensors now, so a crash keeps them."""
        assert evaluation.accuracy is not None
        figures = running.figures
        figures.best_accuracy, figures.best_version = evaluation.accuracy, evaluation.version
        running.output.write_model(
            evaluation.tensors,
            _model_metadata(running, "best", evaluation.version, evaluation.accuracy),
            BEST_MODEL_FILE,
        )

    def _write_history(self, running: _Running) -> None:
        """Append the waiting lines, in version order, up to the first still being evaluated."""
        while running.unwritten and running.unwritten[0]["version"] not in running.awaiting:
            record = running.unwritten.popleft()
            running.output.append_history(record)
            accuracy = record["accuracy"]
            logger.info(
                "version %d: accuracy %s, %d updates folded",
                record["version"],
                "n/a" if accuracy is None else f"{accuracy:.4f}",
                record["updates"],
            )

    def _stop_reason(self, running: _Running) -> str | None:
        if running.stop_requested is not None:
            return running.stop_requested
        stop = running.job.spec.stop
        state = running.state
        if running.diverged is not None:
            return "diverged"
        if (
            stop.target_accuracy is not None
            and (running.figures.last_accuracy or 0.0) >= stop.target_accuracy
        ):
            return "target_accuracy"
        if stop.max_versions is not None and state.version >= stop.max_versions:
            return "max_versions"
        if stop.max_time_s is not None and self.clock() - state.started_at >= stop.max_time_s:
            return "max_time"
        return None

    def _finish(self, running: _Running) -> None:
        state = running.state
        reason = self._stop_reason(running) or "stopped"
        self._apply_evaluations(running, running.evaluator.wait())
        # A diverged model is not scored: its NaN would say nothing the log does not.
        if running.figures.last_evaluated != state.version and running.diverged is None:
            # The final model is always scored, whatever eval_every skipped.
            running.awaiting.add(state.version)
            final = running.evaluator.evaluate_now(state.version, state.model)
            self._apply_evaluations(running, [final])
        running.evaluator.close()
        last = _models(running)["last"]
        running.output.write_model(
            state.model, _model_metadata(running, "last", state.version, last["accuracy"])
        )
        summary = self._summary(running, reason)
        for update_id in state.pending_update_ids:
            running.output.append_rejection(
                {
                    "update_id": update_id,
                    "reason": "job_finished",
                    "detail": "accepted, but the job ended before a version took it",
                }
            )
        running.output.write_summary(summary)
        # Updates folded into the buffer after the last version will never be in a version.
        self._checkpoint(running)
        # Recorded before the ack: a crash between the two finds the summary at the redelivery.
        self._outcomes.record(
            running.job.job_id,
            reason,
            running.stop_detail or running.diverged or "",
            submitted_by=running.delivery.user_id,
        )
        self.transport.ack(running.delivery)
        self._job = None
        self.jobs_done += 1
        self.metrics.job_running.set(0)
        self.metrics.job_stalled.set(0)
        self.metrics.jobs_completed.inc()
        accuracy = running.figures.last_accuracy
        logger.info(
            "job %s finished (%s): version %d, accuracy %s",
            running.job.job_id,
            reason,
            state.version,
            "n/a" if accuracy is None else f"{accuracy:.4f}",
        )

    # ------------------------------------------------------------------ progress checks

    def _note_version(self, running: _Running) -> None:
        """A new version: the stall clock restarts; a model with NaN or Inf ends the job."""
        state = running.state
        running.last_version_at = self.clock()
        if running.stalled is not None:
            logger.info("job %s is moving again: version %d", running.job.job_id, state.version)
            running.stalled = None
            self.metrics.job_stalled.set(0)
        self._check_model(running)

    def _check_model(self, running: _Running) -> None:
        """A global model holding NaN or Inf cannot progress: the job ends as `diverged`."""
        state = running.state
        bad = first_nonfinite(state.model)
        if bad is None or running.diverged is not None:
            return
        running.diverged = f"version {state.version}: tensor {bad!r} holds NaN or Inf"
        self.metrics.models_nonfinite.inc()
        logger.warning(
            "job %s diverged: the global model of %s; no task will carry it and the job "
            "ends with stop reason 'diverged'",
            running.job.job_id,
            running.diverged,
        )

    def _note_discarded(self, running: _Running) -> None:
        """Candidate versions the state discarded (not finite): counted, logged, and their
        updates listed in rejections.jsonl; the job goes on from the last good version."""
        for discarded in running.state.take_discarded():
            self.metrics.versions_discarded.inc()
            running.figures.updates_discarded += len(discarded.update_ids)
            logger.warning(
                "job %s: %s (updates %s); the model stays version %d and the job goes on",
                running.job.job_id,
                discarded.detail,
                ", ".join(discarded.update_ids),
                running.state.version,
            )
            for update_id in discarded.update_ids:
                running.output.append_rejection(
                    {"update_id": update_id, "reason": discarded.reason, "detail": discarded.detail}
                )

    def _note_nonfinite_evaluation(
        self, running: _Running, version: int, accuracy: float, loss: float
    ) -> None:
        """An evaluation gave NaN or Inf: counted, logged, and kept out of every figure."""
        running.evaluations_nonfinite += 1
        self.metrics.evaluations_nonfinite.inc()
        logger.warning(
            "job %s: evaluating version %d gave accuracy %r, loss %r; left out of the history "
            "and of the tasks' model metrics (a negative BatchNorm variance or an overflow?)",
            running.job.job_id,
            version,
            accuracy,
            loss,
        )

    def _check_stalled(self, running: _Running, now: float) -> None:
        """Mark the job stalled once no new version appeared for stall_after(); log it once."""
        limit = self.stall_after(running.job)
        idle = now - running.last_version_at
        if running.stalled is not None or idle < limit:
            return
        state = running.state
        alive = len(state.alive_workers(now))
        running.stalled = (
            f"no new version for {idle:.0f} s (limit {limit:.0f} s) at version {state.version}: "
            f"{alive} workers alive (min_workers {running.job.spec.strategy.min_workers}), "
            f"{len(state.pending_update_ids)} updates waiting for a version, "
            f"{sum(state.rejected.values())} rejected"
        )
        self.metrics.job_stalled.set(1)
        logger.warning("job %s is stalled: %s", running.job.job_id, running.stalled)

    def stall_after(self, job: Job) -> float:
        """Seconds without a new version after which a running job counts as stalled."""
        if self.settings.stall_after_s > 0:
            return self.settings.stall_after_s
        return max(STALL_AFTER_MIN_S, 3 * job.spec.strategy.round_deadline_s)

    def _summary(self, running: _Running, reason: str) -> dict[str, Any]:
        state, spec, figures = running.state, running.job.spec, running.figures
        target = spec.stop.target_accuracy
        return {
            "job_id": running.job.job_id,
            # The broker-validated user that published the job (None: its message had none).
            "submitted_by": running.delivery.user_id,
            "strategy": spec.strategy.name,
            "model": spec.model.name,
            "stop_reason": reason,
            "target_accuracy": target,
            "reached_target": figures.time_to_target_s is not None,
            "time_to_target_s": figures.time_to_target_s,
            "final_accuracy": figures.last_accuracy,
            "final_loss": figures.last_loss,
            "best_accuracy": max(figures.best_accuracy, figures.last_accuracy or 0.0),
            "models": _models(running),
            "versions": state.version,
            "rounds": state.round,
            "updates_accepted": state.accepted,
            "updates_rejected": sum(state.rejected.values()),
            "rejected_by_reason": dict(state.rejected),
            "updates_unfolded": len(state.pending_update_ids),
            "updates_discarded": figures.updates_discarded,
            "workers": sorted(state.workers),
            "wall_time_s": self.clock() - state.started_at,
            "bytes_received": figures.bytes_received,
            "bytes_sent": figures.bytes_sent,
            "spec": to_dict(spec),
        }


def _training_for(job: Job, kind: str) -> TrainingConfig:
    """The job's training config with `send` set to what the strategy folds."""
    values = to_dict(job.spec.training) | {"send": kind}
    return TrainingConfig(**values)


def _version_metrics(running: _Running) -> dict[str, float]:
    """The newest finite evaluation, for a task's model: a NaN there would make every worker
    refuse every task (the encoder refuses it too, but a task must never get that far)."""
    figures = running.figures
    out: dict[str, float] = {}
    if figures.last_accuracy is not None:
        out["accuracy"] = figures.last_accuracy
    if figures.last_loss is not None:
        out["loss"] = figures.last_loss
    return {key: value for key, value in out.items() if math.isfinite(value)}


def _model_metadata(
    running: _Running, kind: str, version: int, accuracy: float | None
) -> dict[str, str]:
    """A model file's safetensors metadata (strings only): which job, version and score."""
    return {
        "job_id": running.job.job_id,
        "model": running.job.spec.model.name,
        "kind": kind,
        "version": str(version),
        "accuracy": "" if accuracy is None else repr(accuracy),
    }


def _models(running: _Running) -> dict[str, Any]:
    """summary.json's `models`: which file holds which version, with its held-out accuracy."""
    version, figures = running.state.version, running.figures
    last = figures.last_accuracy if figures.last_evaluated == version else None
    best = None
    if figures.best_version is not None:
        best = {
            "file": BEST_MODEL_FILE,
            "version": figures.best_version,
            "accuracy": figures.best_accuracy,
        }
    return {"last": {"file": MODEL_FILE, "version": version, "accuracy": last}, "best": best}


def _rejection(update: Update, reason: str, detail: str) -> dict[str, str]:
    """A rejected update's line of rejections.jsonl."""
    return {
        "update_id": update.update_id,
        "worker_id": update.worker_id,
        "reason": reason,
        "detail": detail,
    }


def _restore_figures(running: _Running, figures: dict[str, Any]) -> None:
    """Take back the service's own figures of a job from its checkpoint."""
    running.figures = restored = JobFigures.from_dict(figures)
    # The best model is written as soon as its evaluation is in, which may be after the
    # checkpoint: the file on disk, not the checkpoint, says which version it holds.
    best = running.output.model_metadata(BEST_MODEL_FILE)
    if best is not None and best.get("job_id") == running.job.job_id:
        restored.best_version = int(best["version"])
        restored.best_accuracy = max(restored.best_accuracy, float(best["accuracy"]))
