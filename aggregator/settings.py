"""Settings of the aggregator service."""

from __future__ import annotations

from dataclasses import dataclass

from shared.chunks import DEFAULT_CHUNK_SIZE
from shared.errors import ConfigError
from shared.references import check_allowed_modules


@dataclass(frozen=True)
class AggregatorSettings:
    """Where the aggregator connects, keeps its state and serves metrics; how it polls."""

    broker: str = "amqp://guest:guest@localhost:5672/"
    state_dir: str = "./fedq-state"
    # Where a job's history, summary and model go; "" means <state_dir>/jobs/<job_id>.
    output_dir: str = ""
    prefix: str = "fedq"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    metrics_port: int = 0
    # The address /metrics and /healthz listen on ("0.0.0.0": every IPv4 interface).
    metrics_host: str = "0.0.0.0"
    # /healthz answers 503 once the service loop has not gone round for this many seconds.
    health_timeout_s: float = 60.0
    poll_interval_s: float = 0.2
    worker_timeout_s: float = 60.0
    # 0: serve jobs forever; N: exit after N jobs (burst mode for `fedq run` and tests).
    max_jobs: int = 0
    # Messages (updates, or chunks of large ones) RabbitMQ hands the aggregator ahead of acks.
    # The aggregator's memory holds this many at most, however many workers there are.
    prefetch: int = 32
    # Accepted updates wait for a checkpoint before they are acked: one comes with every new
    # version, and sooner after this many updates or seconds (less than the prefetch, or the
    # broker would stop delivering until the interval passed).
    checkpoint_every_updates: int = 16
    checkpoint_interval_s: float = 10.0
    eval_batch_size: int = 1000
    eval_device: str = "cpu"
    # A message larger than this (after reassembly) is dead-lettered as too_large, not decoded;
    # a chunk set announcing more is refused at its first envelope.
    max_message_bytes: int = 512 * 1024 * 1024
    # Incomplete chunk sets: their envelopes are acked as they arrive and kept durably under
    # <state_dir>/chunks, so sets of any size never stall intake. A new set beyond these bounds
    # (how many sets, the sum of their announced sizes) is refused as chunk_limit; a set still
    # incomplete after max age is dead-lettered as incomplete_chunks (docs/protocol.md 7.3).
    max_chunk_sets: int = 256
    max_chunk_pending_bytes: int = 4 * 1024 * 1024 * 1024
    chunk_max_age_s: float = 600.0
    # The same bounds for each sender (its broker user_id, or with require_user_id off, the
    # worker id it claims): a worker sends one update at a time, so a few sets are plenty, and a
    # sender past them is refused its own new sets, never another's. A set that gets no new
    # envelope for chunk_idle_s is dead-lettered (honest sets arrive back to back).
    max_chunk_sets_per_sender: int = 4
    max_chunk_pending_bytes_per_sender: int = 1024 * 1024 * 1024
    chunk_idle_s: float = 120.0
    # Reject (user_mismatch) an update whose worker id is not the broker-validated user_id it
    # was published with, or that has none: workers must connect as a user named like their id
    # and publish with stamp_user_id.
    require_user_id: bool = False
    # The broker users that may submit and cancel jobs (a job or cancel from another user, or
    # without a broker-validated user_id, is refused); empty: any user allowed to write the jobs
    # exchange. With require_user_id, a job or cancel must carry a user_id either way.
    job_submitters: tuple[str, ...] = ()
    # Modules a job's `package.module:function` model or data set may be imported from: each
    # entry allows that module and its submodules (shared.references). Built-in models and data
    # sets need none; empty: no job may import anything.
    allowed_modules: tuple[str, ...] = ()
    # A running job with no new version for this many seconds is reported stalled (/status,
    # fedq_aggregator_job_stalled, one warning); 0: max(300, 3 x the job's round_deadline_s).
    stall_after_s: float = 0.0

    def __post_init__(self) -> None:
        check_allowed_modules(self.allowed_modules)
        if self.max_chunk_sets < 1 or self.max_chunk_pending_bytes < self.max_message_bytes:
            raise ConfigError(
                "max_chunk_sets must be >= 1 and max_chunk_pending_bytes >= max_message_bytes"
            )
        if self.chunk_max_age_s <= 0 or self.chunk_idle_s <= 0:
            raise ConfigError("chunk_max_age_s and chunk_idle_s must be > 0")
        if (
            self.max_chunk_sets_per_sender < 1
            or self.max_chunk_pending_bytes_per_sender < self.max_message_bytes
        ):
            raise ConfigError(
                "max_chunk_sets_per_sender must be >= 1 and max_chunk_pending_bytes_per_sender "
                ">= max_message_bytes"
            )
        if not self.stall_after_s >= 0:
            raise ConfigError("stall_after_s must be >= 0 (0: automatic)")
        if self.prefetch < 1:
            raise ConfigError("prefetch must be at least 1")
        if not 1 <= self.checkpoint_every_updates < self.prefetch:
            raise ConfigError(
                f"checkpoint_every_updates ({self.checkpoint_every_updates}) must be at least 1 "
                f"and less than prefetch ({self.prefetch})"
            )
