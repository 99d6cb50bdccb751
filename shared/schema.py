"""The wire messages (job, model, task, update, hello, cancel, failure) and the constants of their
fields: what each message holds, not how it is encoded (shared/codec.py)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from shared.jobs import JobSpec, ModelSpec, TrainingConfig
from shared.tensors import Tensors

PROTOCOL_VERSION = 1
# Ids name queues and routing keys, so they are restricted to a safe alphabet.
# \Z, not $: $ also matches before a trailing newline, which would let "abc\n" through.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
MAX_NUM_SAMPLES = 1_000_000_000
MAX_METRICS = 64
# A failure's reason is a short code (data_mismatch, training_error, ...); its detail is text for
# people, cut to this many characters by the receiver.
REASON_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")
MAX_FAILURE_DETAIL = 1024


@dataclass(frozen=True)
class Job:
    """A job submission: train `spec` under `job_id`."""

    job_id: str
    spec: JobSpec
    submitted_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class GlobalModel:
    """A version of the global model of a job: its architecture and weights."""

    job_id: str
    version: int
    model: ModelSpec
    tensors: Tensors
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A training task (round announcement) for one worker: train this model with this config."""

    job_id: str
    task_id: str
    worker_id: str
    round: int | None
    training: TrainingConfig
    model: GlobalModel
    issued_at: float = field(default_factory=time.time)

    @property
    def version(self) -> int:
        """The version of the global model the worker trains from."""
        return self.model.version


@dataclass(frozen=True)
class Update:
    """A worker's result: weights or delta trained from `base_version`, with local metrics."""

    job_id: str
    update_id: str
    worker_id: str
    task_id: str
    base_version: int
    round: int | None
    kind: str
    num_samples: int
    tensors: Tensors
    metrics: dict[str, float] = field(default_factory=dict)
    sent_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Hello:
    """A worker announcing that it is alive and idle, so the aggregator may give it a task."""

    worker_id: str
    num_samples: int
    device: str
    sent_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Cancel:
    """An operator asking the aggregator to end a job, running or queued (reason `cancelled`)."""

    job_id: str
    sent_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Failure:
    """A worker's report that it cannot train a task: a short stable reason and a detail."""

    worker_id: str
    job_id: str
    task_id: str
    reason: str
    detail: str
    sent_at: float = field(default_factory=time.time)


# The message types of shared.codec's table (MESSAGE_TYPES); a type added there is added here.
Message = Job | GlobalModel | Task | Update | Hello | Cancel | Failure
