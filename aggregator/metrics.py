"""Prometheus metrics of the aggregator, registered on an injected registry."""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

JOB_STATES = ("idle", "running")
# The reasons a worker gives for a task it cannot train that get a label of their own; any other
# (the wire allows any short code) is counted as "other", so the label stays bounded. The metric
# also has the aggregator's own findings: "no_task_queue", a task no queue is bound for, and
# "missed_deadline", a worker that let a FedAvg round's deadline pass without an update.
FAILURE_REASONS = ("data_mismatch", "model_not_allowed", "training_error", "wrong_worker")


class AggregatorMetrics:
    """The aggregator's counters, gauges and histograms (names prefixed fedq_, base units)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.updates_received = Counter(
            "fedq_aggregator_updates_received", "Update messages received.", registry=registry
        )
        self.updates_accepted = Counter(
            "fedq_aggregator_updates_accepted", "Updates folded into a model.", registry=registry
        )
        self.updates_rejected = Counter(
            "fedq_aggregator_updates_rejected",
            "Messages rejected and dead-lettered, by reason.",
            ["reason"],
            registry=registry,
        )
        self.worker_failures = Counter(
            "fedq_aggregator_worker_failures",
            "Failure reports of workers that cannot train a task, by reason.",
            ["reason"],
            registry=registry,
        )
        self.staleness = Histogram(
            "fedq_aggregator_update_staleness",
            "Staleness (versions behind) of accepted updates.",
            buckets=(0, 1, 2, 3, 5, 8, 13, 21, 34, 55),
            registry=registry,
        )
        self.update_size = Histogram(
            "fedq_aggregator_update_size_bytes",
            "Encoded size of received updates.",
            buckets=tuple(2.0**k for k in range(10, 32, 2)),
            registry=registry,
        )
        self.aggregation_duration = Histogram(
            "fedq_aggregator_aggregation_duration_seconds",
            "Time to fold one update in, including a new version when it completes one.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.evaluation_duration = Histogram(
            "fedq_aggregator_evaluation_duration_seconds",
            "Time to evaluate one version on the held-out data (on the evaluation thread).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.evaluations_skipped = Counter(
            "fedq_aggregator_evaluations_skipped",
            "Versions left unevaluated because a newer one was waiting for the evaluator.",
            registry=registry,
        )
        self.model_version = Gauge(
            "fedq_aggregator_model_version", "Current global model version.", registry=registry
        )
        self.round = Gauge(
            "fedq_aggregator_round", "Current synchronous round (0 when async).", registry=registry
        )
        self.eval_accuracy = Gauge(
            "fedq_aggregator_eval_accuracy_ratio",
            "Held-out accuracy of the newest evaluated version.",
            registry=registry,
        )
        self.eval_loss = Gauge(
            "fedq_aggregator_eval_loss",
            "Held-out loss of the newest evaluated version.",
            registry=registry,
        )
        self.workers_active = Gauge(
            "fedq_aggregator_workers_active", "Workers seen recently.", registry=registry
        )
        self.last_model_timestamp = Gauge(
            "fedq_aggregator_last_model_timestamp_seconds",
            "Unix time of the newest model version.",
            registry=registry,
        )
        self.job_running = Gauge(
            "fedq_aggregator_job_running", "1 while a job is running.", registry=registry
        )
        self.jobs_completed = Counter(
            "fedq_aggregator_jobs_completed", "Jobs finished.", registry=registry
        )
        self.bytes_received = Counter(
            "fedq_aggregator_received_bytes",
            "Bytes of updates received for the running job.",
            registry=registry,
        )
        self.bytes_sent = Counter(
            "fedq_aggregator_sent_bytes", "Bytes of tasks published.", registry=registry
        )
        self.chunk_sets_pending = Gauge(
            "fedq_aggregator_chunk_sets_pending",
            "Incomplete chunk sets held (their envelopes are acked and spooled on disk).",
            registry=registry,
        )
        self.chunk_pending_bytes = Gauge(
            "fedq_aggregator_chunk_pending_bytes",
            "Bytes of the incomplete chunk sets held so far.",
            registry=registry,
        )
        # Jobs that cannot progress (docs/monitoring.md).
        self.evaluations_nonfinite = Counter(
            "fedq_aggregator_evaluations_nonfinite",
            "Evaluations whose accuracy or loss was NaN or Inf (left out of history and tasks).",
            registry=registry,
        )
        self.models_nonfinite = Counter(
            "fedq_aggregator_models_nonfinite",
            "Global model versions holding NaN or Inf; each ends its job as diverged.",
            registry=registry,
        )
        self.versions_discarded = Counter(
            "fedq_aggregator_versions_discarded",
            "Candidate model versions that held NaN or Inf: never published, their updates let go.",
            registry=registry,
        )
        self.job_stalled = Gauge(
            "fedq_aggregator_job_stalled",
            "1 while the running job has made no new version for stall_after_s.",
            registry=registry,
        )
        self.started_at = time.time()
        registry.register(_ScrapeTimeCollector(self))


class _ScrapeTimeCollector(Collector):
    """Metrics computed when scraped from the ones the service sets: the age of the newest
    model (an alert needs no clock arithmetic) and the job state as one gauge per state.
    """

    def __init__(self, metrics: AggregatorMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        """The derived metrics' current values."""
        last = _value(self.metrics.last_model_timestamp) or self.metrics.started_at
        yield GaugeMetricFamily(
            "fedq_aggregator_last_model_age_seconds",
            "Seconds since the newest model version appeared (since start-up before the first).",
            value=max(0.0, time.time() - last),
        )
        running = _value(self.metrics.job_running) > 0
        state = GaugeMetricFamily(
            "fedq_aggregator_job_state",
            "1 for the aggregator's current job state, 0 for the others.",
            labels=["state"],
        )
        for name in JOB_STATES:
            state.add_metric([name], float((name == "running") == running))
        yield state

    def describe(self) -> Iterable[Metric]:
        """Names only, so that registering checks them against the other metrics' names."""
        yield GaugeMetricFamily("fedq_aggregator_last_model_age_seconds", "")
        yield GaugeMetricFamily("fedq_aggregator_job_state", "", labels=["state"])


def _value(gauge: Gauge) -> float:
    """A label-less gauge's current value, through the public collect() API."""
    return float(next(iter(gauge.collect())).samples[0].value)
