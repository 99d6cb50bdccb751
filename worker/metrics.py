"""Prometheus metrics of a worker, registered on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# The phases of a task cycle, in order; consecutive, so they add up to the wall-clock.
# wait_aggregator: from publishing an update to the aggregator issuing the next task (the
# task's issued_at, the aggregator's clock); wait_delivery: from then to the task's arrival.
# handoff: from training done to the service loop noticing it.
PHASES = (
    "wait_aggregator",
    "wait_delivery",
    "decode",
    "load",
    "train",
    "extract",
    "encode",
    "handoff",
    "publish",
)


class WorkerMetrics:
    """The worker's counters, gauges and histograms (names prefixed fedq_, base units)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tasks_received = Counter(
            "fedq_worker_tasks_received", "Tasks received.", registry=registry
        )
        self.tasks_completed = Counter(
            "fedq_worker_tasks_completed", "Tasks trained and answered.", registry=registry
        )
        self.tasks_failed = Counter(
            "fedq_worker_tasks_failed",
            "Tasks that failed, by reason.",
            ["reason"],
            registry=registry,
        )
        self.tasks_superseded = Counter(
            "fedq_worker_tasks_superseded", "Tasks dropped for a newer one.", registry=registry
        )
        self.training_duration = Histogram(
            "fedq_worker_training_duration_seconds",
            "Wall-clock of local training per task.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=registry,
        )
        self.samples_trained = Counter(
            "fedq_worker_samples_trained", "Training examples processed.", registry=registry
        )
        self.last_loss = Gauge(
            "fedq_worker_last_loss", "Training loss of the last task.", registry=registry
        )
        self.last_accuracy = Gauge(
            "fedq_worker_last_accuracy_ratio",
            "Training accuracy of the last task.",
            registry=registry,
        )
        self.bytes_sent = Counter(
            "fedq_worker_sent_bytes", "Bytes of updates published.", registry=registry
        )
        self.bytes_received = Counter(
            "fedq_worker_received_bytes", "Bytes of tasks received.", registry=registry
        )
        self.phase_seconds = Counter(
            "fedq_worker_phase_seconds",
            "Wall-clock from the first task received to the last update published, by phase:"
            " train is local training, the others are overhead.",
            ["phase"],
            registry=registry,
        )
        for phase in PHASES:
            self.phase_seconds.labels(phase)
        self.device = Info(
            "fedq_worker_device", "The torch device the worker trains on.", registry=registry
        )
