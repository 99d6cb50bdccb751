"""The aggregator's state machine for one job: versions, strategy buffers, rounds, dedupe.

No I/O happens here. The service feeds it updates, hellos and clock readings and carries out
what it decides (send tasks, evaluate and publish a new version, settle deliveries).
"""

from __future__ import annotations

import math
import random
import secrets
import statistics
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator.aggregation import (
    WeightedSum,
    cast_like,
    fedbuff_step,
    is_averaged,
    mix,
    staleness_factor,
)
from aggregator.tasks import KEY_BYTES, TaskIds
from shared.errors import TensorError
from shared.messages import Job, Update
from shared.tensors import Tensors, check_like, first_nonfinite, largest_finite_abs

# A task re-issued to a worker that says it is idle must be at least this old: the hello may
# simply have crossed the task on the wire.
REISSUE_GRACE_S = 10.0
# The norm bound's reference for "normal" (docs/reliability.md, "The norm bound"): the median,
# over workers, of the norm of each worker's latest update that passed the other checks (accepted
# or rejected by the bound), once NORM_MIN_WORKERS workers sent one. One worker moves it by one
# rank at most, whatever it sends; an honest majority whose norms all rise (after a poisoning)
# lifts it with them at their next updates. (A longer window per worker would only make that
# recovery slower: the median over workers already smooths one worker's odd update.)
NORM_MIN_WORKERS = 3


@dataclass(frozen=True)
class Accepted:
    """The update was folded in; `new_version` is set when it completed a new model version."""

    update_id: str
    staleness: int
    new_version: int | None = None


@dataclass(frozen=True)
class Rejected:
    """The update was rejected: a short stable `reason` and a human-readable detail."""

    update_id: str
    reason: str
    detail: str


Outcome = Accepted | Rejected


@dataclass(frozen=True)
class Discarded:
    """A candidate version was not finite: it was never published, the model stays the last good
    one, and the updates folded into it (accepted before) are let go with this `reason`."""

    update_ids: tuple[str, ...]
    reason: str
    detail: str


@dataclass
class VersionRecord:
    """What went into one model version, for its line of history.jsonl."""

    version: int
    round: int | None
    time_s: float
    update_ids: list[str]
    staleness: list[int]
    train_loss: float | None

    @property
    def mean_staleness(self) -> float:
        """Mean staleness of the updates folded into this version."""
        return sum(self.staleness) / len(self.staleness) if self.staleness else 0.0


class WorkerRegistry:
    """When each worker last said hello: the service keeps one for all its jobs, and each job's
    state reads it, so a hello that came before a job started counts in that job."""

    def __init__(self) -> None:
        self._hellos: dict[str, float] = {}

    def note_hello(self, worker_id: str, now: float) -> None:
        """A worker said hello (it is alive, and idle)."""
        self._hellos[worker_id] = now

    def last_hello(self, worker_id: str) -> float:
        """When the worker last said hello (-inf if never)."""
        return self._hellos.get(worker_id, -math.inf)

    def ids(self) -> set[str]:
        """Every worker that said hello."""
        return set(self._hellos)

    def active(self, now: float, timeout_s: float) -> int:
        """How many workers said hello within timeout_s."""
        return sum(1 for seen in self._hellos.values() if now - seen <= timeout_s)


@dataclass
class WorkerInfo:
    """What one job knows of a worker besides its hellos: its task and its updates."""

    last_update: float = -math.inf
    task_id: str | None = None
    task_issued_at: float = 0.0
    updates: int = 0


@dataclass
class _Pending:
    """Updates folded since the last version: ids, staleness, train losses and task slots."""

    update_ids: list[str] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    losses: list[tuple[float, int]] = field(default_factory=list)
    slots: list[str] = field(default_factory=list)


class JobState:
    """The state of one running job under its strategy; see the module docstring."""

    def __init__(
        self,
        job: Job,
        initial: Tensors,
        started_at: float,
        worker_timeout_s: float,
        buffers: Collection[str] = (),
        task_key: bytes | None = None,
        registry: WorkerRegistry | None = None,
    ):
        self.job = job
        self.strategy = job.spec.strategy
        self.model: Tensors = {name: np.array(a) for name, a in initial.items()}
        # Tensors that are statistics, not weights (the model's buffers, and any integer tensor,
        # which cannot be a parameter): set from the updates' values, never moved by a delta.
        self.buffers = frozenset(buffers) | {n for n, a in self.model.items() if not is_averaged(a)}
        self.version = 0
        self.round = 0 if self.strategy.name == "fedavg" else None
        self.started_at = started_at
        self.worker_timeout_s = worker_timeout_s
        # The workers' hellos (the service's registry, shared by its jobs; a fresh one
        # otherwise), and what this job knows of each worker besides them.
        self.registry = registry if registry is not None else WorkerRegistry()
        self._workers: dict[str, WorkerInfo] = {}
        # Workers that reported they cannot train this job: (reason, detail); no more tasks.
        self.failed: dict[str, tuple[str, str]] = {}
        self.seen_update_ids: set[str] = set()
        # The same ids in the order they were seen: checkpoints log only the ones added since.
        self._seen_order: list[str] = []
        # The newest version's record (None until one is made, and after a restore): the
        # service reads it once, as it writes that version's history line.
        self.last_record: VersionRecord | None = None
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self._pending = _Pending()
        self._buffer = WeightedSum(self.model)
        self._round_started = started_at
        self._round_selected: set[str] = set()
        self._round_contributors: set[str] = set()
        self._rng = random.Random(job.spec.seed)
        self._mean_samples = 0.0
        # Task ids verify against the key (the service's, kept in its state directory; a fresh
        # one otherwise), so tasks issued before a restart are still known after it.
        self.tasks = TaskIds(task_key or secrets.token_bytes(KEY_BYTES), job.job_id)
        # What accepted updates answered (see _task_slot), in the order used: one update each.
        self.used_tasks: set[str] = set()
        self._used_order: list[str] = []
        # Slots of updates whose version was discarded (never published): usable once more, so
        # a FedAvg round run again takes its workers' new updates.
        self._released: set[str] = set()
        # fedavg: workers that let a task pass its round's deadline without an update; rounds
        # do not wait for them until they send one. The newly added, for the service to count.
        self.missed_deadline: set[str] = set()
        self._newly_missed: list[str] = []
        # The norm bound: each worker's latest norm (the entries of the reference).
        self._worker_norms: dict[str, float] = {}
        # FedBuff's range check: the largest |value| of each tensor of the current model.
        self._model_max_abs: dict[str, float] = {}
        # FedAsync's next model, made by _fold, published (or discarded) by _maybe_advance.
        self._candidate: Tensors | None = None
        self._discarded: list[Discarded] = []

    @property
    def update_kind(self) -> str:
        """What workers send: FedBuff folds deltas, FedAvg and FedAsync fold weights."""
        return "delta" if self.strategy.name == "fedbuff" else "weights"

    # ------------------------------------------------------------------ workers

    @property
    def workers(self) -> set[str]:
        """Every worker the job knows of: those that said hello (before it started too) and
        those that sent it an update."""
        return self.registry.ids() | self._workers.keys()

    def note_worker(self, worker_id: str, now: float) -> None:
        """Record a worker's hello (in the registry, where the service records them)."""
        self.registry.note_hello(worker_id, now)

    def note_idle(self, worker_id: str, now: float) -> None:
        """A worker said it is idle: a task it holds for too long was lost, so forget it."""
        info = self._workers.get(worker_id)
        if info and info.task_id and now - info.task_issued_at > REISSUE_GRACE_S:
            info.task_id = None

    def note_task(self, worker_id: str, task_id: str, now: float) -> None:
        """Record that a task was sent to a worker."""
        info = self._workers.setdefault(worker_id, WorkerInfo())
        info.task_id, info.task_issued_at = task_id, now
        if self.round is not None:
            self._round_selected.add(worker_id)

    def new_task_id(self, worker_id: str) -> str:
        """A task id for a task to this worker with the current model (not yet sent)."""
        return self.tasks.issue(worker_id, self.version)

    def take_missed_deadline(self) -> list[str]:
        """Workers that let their task pass a round's deadline since the last call."""
        taken, self._newly_missed = self._newly_missed, []
        return taken

    def note_failure(self, worker_id: str, task_id: str, reason: str, detail: str) -> bool:
        """A worker cannot train this job: it gets no more tasks for it, and a round no longer
        waits for it. Return whether this is its first failure in the job."""
        info = self._workers.get(worker_id)
        if info is not None and info.task_id == task_id:
            info.task_id = None
        if worker_id not in self._round_contributors:
            self._round_selected.discard(worker_id)
        first = worker_id not in self.failed
        self.failed[worker_id] = (reason, detail)
        return first

    def _task_of(self, worker_id: str) -> str | None:
        info = self._workers.get(worker_id)
        return info.task_id if info is not None else None

    def _last_seen(self, worker_id: str) -> float:
        """When the worker was last heard from: its last hello or its last accepted update."""
        info = self._workers.get(worker_id)
        last_update = info.last_update if info is not None else -math.inf
        return max(self.registry.last_hello(worker_id), last_update)

    def alive_workers(self, now: float) -> list[str]:
        """Workers seen recently or working on a task, in id order; not those that failed."""
        return sorted(
            w
            for w in self.workers
            if w not in self.failed
            and (self._task_of(w) is not None or now - self._last_seen(w) <= self.worker_timeout_s)
        )

    def workers_to_task(self, now: float) -> list[str]:
        """Which workers should be sent a task with the current model now."""
        idle = [w for w in self.alive_workers(now) if self._task_of(w) is None]
        if self.round is None:
            return idle
        # Synchronous: each worker trains at most once per round; with fraction < 1 a sample
        # of the alive workers is chosen once, when the round starts.
        candidates = [w for w in idle if w not in self._round_contributors]
        if self.strategy.fraction >= 1.0:
            return candidates
        quota = math.ceil(self.strategy.fraction * len(self.alive_workers(now)))
        again = [w for w in candidates if w in self._round_selected]
        fresh = [w for w in candidates if w not in self._round_selected]
        free = max(0, min(quota - len(self._round_selected), len(fresh)))
        return again + self._rng.sample(fresh, free)

    # ------------------------------------------------------------------ updates

    def count_rejection(self, reason: str) -> None:
        """Count one rejected update of the job under its reason (summary.json's
        rejected_by_reason); offer counts its own, the service those it rejects before offer."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def offer(self, update: Update, now: float) -> Outcome:
        """Validate an update of this job and fold it in; may complete a new version.

        Which job an update is for is the service's to check (it tells an unknown job from one
        that ended, and records the latter in that job's run directory): it offers a job's
        state only that job's updates.
        """
        # A candidate version that overflows anyway is discarded (_publish) and reported by the
        # service, so numpy's warning would only repeat that.
        with np.errstate(over="ignore", invalid="ignore"):
            return self._offer(update, now)

    def _offer(self, update: Update, now: float) -> Outcome:
        largest: dict[str, float] = {}
        rejection = self._check(update)
        if rejection is None:
            try:
                # One min and max per tensor, reused by the range check and the sum's bound.
                largest = largest_finite_abs(update.tensors)
            except TensorError as e:
                rejection = Rejected(update.update_id, e.reason, str(e))
        if rejection is None:
            rejection = self._check_range(update, largest)
        if rejection is None and self.strategy.max_update_norm_ratio is not None:
            rejection = self._check_norm(update, self._change_norm(update))
        if rejection is not None:
            self.count_rejection(rejection.reason)
            if rejection.reason != "duplicate":
                self._remember(update.update_id)
            return rejection
        self._remember(update.update_id)
        slot = self._task_slot(update)
        if slot in self._released:
            self._released.discard(slot)
        else:
            self._use(slot)
        self._pending.slots.append(slot)
        self.missed_deadline.discard(update.worker_id)
        staleness = self.version - update.base_version
        info = self._workers.setdefault(update.worker_id, WorkerInfo())
        info.last_update = now
        info.updates += 1
        if info.task_id == update.task_id:
            info.task_id = None
        self._fold(update, staleness, largest)
        self.accepted += 1
        new_version = self._maybe_advance(now)
        return Accepted(update.update_id, staleness, new_version)

    def _remember(self, update_id: str) -> None:
        if update_id not in self.seen_update_ids:
            self.seen_update_ids.add(update_id)
            self._seen_order.append(update_id)

    def _use(self, slot: str) -> None:
        self.used_tasks.add(slot)
        self._used_order.append(slot)

    def _task_slot(self, update: Update) -> str:
        """What an accepted update uses up: its task (one update per task); in fedavg, its
        worker's place in the round of its task (one update per worker per round; a task's
        round is the version it carries). A '/' never occurs in an id."""
        if self.round is None:
            return update.task_id
        return f"{update.base_version}/{update.worker_id}"

    def _check(self, update: Update) -> Rejected | None:
        def no(reason: str, detail: str) -> Rejected:
            return Rejected(update.update_id, reason, detail)

        if update.update_id in self.seen_update_ids:
            return no("duplicate", "update id already accounted for")
        if update.base_version > self.version:
            return no("future_version", f"base {update.base_version} > version {self.version}")
        staleness = self.version - update.base_version
        limit = self.strategy.max_staleness
        if limit is not None and staleness > limit:
            return no("too_stale", f"staleness {staleness} > max_staleness {limit}")
        if not self.tasks.verify(update.task_id, update.worker_id, update.base_version):
            detail = f"task {update.task_id!r} was not issued to {update.worker_id!r} at version"
            return no("unknown_task", f"{detail} {update.base_version}")
        slot = self._task_slot(update)
        if slot in self.used_tasks and slot not in self._released:
            if self.round is not None:
                detail = (
                    f"{update.worker_id!r} already sent an update for round {update.base_version}"
                )
                return no("round_contributed", detail)
            return no("task_used", f"an update for task {update.task_id!r} was already accepted")
        if update.kind != self.update_kind:
            return no("wrong_kind", f"{self.strategy.name} needs {self.update_kind}")
        try:
            check_like(update.tensors, self.model)
        except TensorError as e:
            return no(e.reason, str(e))
        return None

    def _change_norm(self, update: Update) -> float:
        """L2 norm, in float64, of what the update would change in floating-point tensors.

        Weights and buffers are values, measured against the global model; deltas are changes.
        """
        total = 0.0
        for name, array in update.tensors.items():
            if not is_averaged(array):
                continue
            change = array.astype(np.float64).ravel()
            if self.update_kind == "weights" or name in self.buffers:
                change -= self.model[name].ravel()
            total += float(np.dot(change, change))
        return math.sqrt(total)

    def _check_range(self, update: Update, largest_abs: dict[str, float]) -> Rejected | None:
        """FedBuff: reject a delta d for which x + server_lr * d leaves the dtype's range.

        A FedBuff step is x + server_lr * sum_i c_i d_i with c_i >= 0 and sum_i c_i <= 1 (f(s)
        <= 1): a convex combination of x and the points x + server_lr * d_i. If each of those is
        in range, so is the step, whatever the buffer holds. The check uses the delta's largest
        |value| (`largest_abs`, from the finiteness check); only a delta near the limit is looked
        at element by element.
        """
        if self.update_kind != "delta":
            return None  # weights and buffers are averaged: a convex mix of finite values
        lr = self.strategy.server_lr
        for name, delta in update.tensors.items():
            if not is_averaged(delta) or name in self.buffers or not delta.size:
                continue
            limit = float(np.finfo(delta.dtype).max)
            if self._max_abs(name) + lr * largest_abs[name] <= limit:
                continue
            x = self.model[name]
            # In float64 (a float64 model's may overflow to Inf, which is out of range too).
            moved = x.astype(np.float64) + lr * delta.astype(np.float64)
            if not np.all(np.abs(moved) <= limit):
                detail = (
                    f"tensor {name!r}: model + server_lr x delta leaves the range of {x.dtype} "
                    f"(|value| <= {limit:.6g})"
                )
                return Rejected(update.update_id, "out_of_range", detail)
        return None

    def _max_abs(self, name: str) -> float:
        """The largest |value| of a tensor of the current model (cached until it changes)."""
        if name not in self._model_max_abs:
            x = self.model[name]
            self._model_max_abs[name] = max(-float(x.min()), float(x.max())) if x.size else 0.0
        return self._model_max_abs[name]

    def _check_norm(self, update: Update, norm: float) -> Rejected | None:
        """Reject a change far larger than normal (strategy bound); then note its norm."""
        ratio = self.strategy.max_update_norm_ratio
        reference = self.norm_reference()
        rejection = None
        # A zero reference (updates that changed nothing) would reject every real change.
        if ratio is not None and reference is not None and 0 < reference < norm / ratio:
            detail = (
                f"change norm {norm:.6g} > {ratio:g} x {reference:.6g}, the median over "
                f"workers of their latest norms"
            )
            rejection = Rejected(update.update_id, "norm_too_large", detail)
        self._worker_norms[update.worker_id] = norm
        return rejection

    def norm_reference(self) -> float | None:
        """What the norm bound takes as normal: the median over workers of their latest norms;
        None until NORM_MIN_WORKERS workers sent one."""
        if len(self._worker_norms) < NORM_MIN_WORKERS:
            return None
        return float(statistics.median(self._worker_norms.values()))

    def _fold(self, update: Update, staleness: int, largest_abs: dict[str, float]) -> None:
        factor = staleness_factor(staleness, self.strategy)
        n = update.num_samples
        if self.strategy.name == "fedasync":
            self._mean_samples += (n - self._mean_samples) / (self.accepted + 1)
            alpha = min(1.0, self.strategy.alpha * factor * n / self._mean_samples)
            self._candidate = cast_like(mix(self.model, update.tensors, alpha), self.model)
        elif self.strategy.name == "fedbuff":
            self._buffer.add(update.tensors, n * factor, norm=n, max_abs=largest_abs)
        else:
            self._buffer.add(update.tensors, n * factor, max_abs=largest_abs)
            self._round_contributors.add(update.worker_id)
        p = self._pending
        p.update_ids.append(update.update_id)
        p.staleness.append(staleness)
        if "loss" in update.metrics:
            p.losses.append((update.metrics["loss"], n))

    # ------------------------------------------------------------------ versions

    def _maybe_advance(self, now: float) -> int | None:
        name = self.strategy.name
        if name == "fedasync" and self._candidate is not None:
            candidate, self._candidate = self._candidate, None
            return self._publish(candidate, now)
        if name == "fedbuff" and self._buffer.count >= self.strategy.buffer_size:
            step = fedbuff_step(self.model, self._buffer, self.strategy.server_lr, self.buffers)
            return self._publish(cast_like(step, self.model), now)
        if name == "fedavg" and self._round_complete(now):
            return self._publish(cast_like(self._buffer.mean(), self.model), now)
        return None

    def _publish(self, candidate: Tensors, now: float) -> int | None:
        """Make the candidate the new version; one that is not finite is discarded instead.

        The checks on updates keep every version of a float32 or float16 model finite; this is
        the last line of defence (a float64 model's sum can overflow): a global model holding NaN
        or Inf would make every later update useless.
        """
        bad = first_nonfinite(candidate)
        if bad is None:
            self.model = candidate
            self._model_max_abs = {}
            return self._advance(now)
        p = self._pending
        detail = (
            f"the version after {self.version} would hold NaN or Inf in tensor {bad!r}: not "
            f"published; the {len(p.update_ids)} updates folded into it are let go"
        )
        self._discarded.append(Discarded(tuple(p.update_ids), "version_not_finite", detail))
        self._released.update(p.slots)
        self._pending = _Pending()
        self._buffer.reset()
        if self.round is not None:
            self._restart_round(now)  # the same round, run again from the last good model
        return None

    def take_discarded(self) -> list[Discarded]:
        """The candidate versions discarded since the last call (for the service to report)."""
        discarded, self._discarded = self._discarded, []
        return discarded

    def _round_complete(self, now: float) -> bool:
        got = self._buffer.count
        if got == 0:
            return False
        # A worker that let an earlier round's deadline pass is not waited for.
        waited = self._round_selected - self.missed_deadline
        wanted = self.strategy.min_updates or max(1, len(waited))
        if len(self._round_contributors) >= wanted and got >= 1:
            return True
        overdue = now - self._round_started >= self.strategy.round_deadline_s
        return overdue and got >= self.strategy.min_updates_on_deadline

    def check_deadline(self, now: float) -> int | None:
        """Close a synchronous round whose deadline passed with enough updates; else None."""
        if self.strategy.name != "fedavg" or not self._round_complete(now):
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            return self._publish(cast_like(self._buffer.mean(), self.model), now)

    def _advance(self, now: float) -> int:
        p = self._pending
        weight = sum(n for _, n in p.losses)
        loss = sum(v * n for v, n in p.losses) / weight if weight else None
        self.version += 1
        self.last_record = VersionRecord(
            self.version, self.round, now - self.started_at, p.update_ids, p.staleness, loss
        )
        self._pending = _Pending()
        self._buffer.reset()
        if self.round is not None:
            if now - self._round_started >= self.strategy.round_deadline_s:
                missed = self._round_selected - self._round_contributors - self.missed_deadline
                missed -= self.failed.keys()
                self.missed_deadline |= missed
                self._newly_missed += sorted(missed)
            self.round += 1
            self._restart_round(now)
        return self.version

    def _restart_round(self, now: float) -> None:
        self._round_started = now
        self._round_selected = set()
        self._round_contributors = set()
        for info in self._workers.values():
            info.task_id = None

    @property
    def pending_update_ids(self) -> list[str]:
        """Updates folded since the last version (in a buffer or an open round)."""
        return list(self._pending.update_ids)

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, now: float) -> dict[str, Any]:
        """Everything needed to go on after a restart, as plain data and arrays.

        Worker bookkeeping is left out on purpose: workers say hello again, and a task issued
        before a crash is re-issued when its worker next says it is idle.
        """
        p = self._pending
        snap: dict[str, Any] = {
            "version": self.version,
            "round": self.round,
            "elapsed_s": now - self.started_at,
            "model": self.model,
            "buffer_weight": self._buffer.total_weight,
            "buffer_norm": self._buffer.norm,
            "buffer_count": self._buffer.count,
            "pending_update_ids": list(p.update_ids),
            "pending_staleness": list(p.staleness),
            "pending_losses": [[loss, n] for loss, n in p.losses],
            "pending_slots": list(p.slots),
            "released_tasks": sorted(self._released),
            # The live list, in the order seen, not a copy: the checkpoint store writes only the
            # ids it has not logged yet, so a checkpoint's cost does not grow with the job.
            "seen_update_ids": self._seen_order,
            "used_tasks": self._used_order,
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "round_contributors": sorted(self._round_contributors),
            "mean_samples": self._mean_samples,
            "worker_norms": dict(self._worker_norms),
        }
        if self._buffer.count:
            # An empty buffer is all zeros: leaving it out halves a version's checkpoint.
            snap["buffer"] = dict(self._buffer.sums)
        return snap

    def restore(self, snap: dict[str, Any], now: float) -> None:
        """Take the state of a snapshot made by snapshot() (already validated by the reader)."""
        check_like(snap["model"], self.model)
        self.version = int(snap["version"])
        self.round = snap["round"]
        self.started_at = now - float(snap["elapsed_s"])
        self.model = {name: np.array(a) for name, a in snap["model"].items()}
        self._model_max_abs = {}
        self._buffer = WeightedSum(self.model)
        if "buffer" in snap:
            # A sum widened to float64 (its bound said it could overflow) stays float64.
            self._buffer.restore(snap["buffer"])
        self._buffer.total_weight = float(snap["buffer_weight"])
        self._buffer.norm = float(snap["buffer_norm"])
        self._buffer.count = int(snap["buffer_count"])
        self._pending = _Pending(
            list(snap["pending_update_ids"]),
            list(snap["pending_staleness"]),
            [(float(loss), int(n)) for loss, n in snap["pending_losses"]],
            # Checkpoints written before task slots were kept have none (nor released ones).
            list(snap.get("pending_slots", [])),
        )
        self._released = set(snap.get("released_tasks", []))
        self._seen_order = list(snap["seen_update_ids"])
        self.seen_update_ids = set(self._seen_order)
        # Checkpoints written before task ids were checked have none: none was used.
        self._used_order = list(snap.get("used_tasks", []))
        self.used_tasks = set(self._used_order)
        self.accepted = int(snap["accepted"])
        self.rejected = dict(snap["rejected"])
        self._round_started = now
        self._round_contributors = set(snap["round_contributors"])
        self._mean_samples = float(snap["mean_samples"])
        # Checkpoints written before the per-worker reference (or the norm bound) have none of
        # its norms: it starts afresh.
        norms = snap.get("worker_norms", {})
        self._worker_norms = {str(worker): float(norm) for worker, norm in norms.items()}
