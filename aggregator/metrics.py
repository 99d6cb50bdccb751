"""Prometheus metrics of the aggregator, registered on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
            "fedq_aggregator_received_bytes", "Bytes of messages received.", registry=registry
        )
        self.bytes_sent = Counter(
            "fedq_aggregator_sent_bytes", "Bytes of tasks published.", registry=registry
        )
