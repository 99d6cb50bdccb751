"""Tests of the aggregator's metrics computed at scrape time."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from aggregator.metrics import AggregatorMetrics


@pytest.mark.timeout(10)
def test_last_model_age_is_the_seconds_since_the_newest_model_timestamp() -> None:
    registry = CollectorRegistry()
    metrics = AggregatorMetrics(registry)

    metrics.last_model_timestamp.set(time.time() - 100)
    age = registry.get_sample_value("fedq_aggregator_last_model_age_seconds")

    assert age is not None and 100 <= age < 110


@pytest.mark.timeout(10)
def test_last_model_age_counts_from_start_up_before_any_model() -> None:
    registry = CollectorRegistry()
    metrics = AggregatorMetrics(registry)
    metrics.started_at -= 30

    age = registry.get_sample_value("fedq_aggregator_last_model_age_seconds")

    assert age is not None and 30 <= age < 40


@pytest.mark.timeout(10)
def test_job_state_shows_one_state_at_a_time_following_job_running() -> None:
    registry = CollectorRegistry()
    metrics = AggregatorMetrics(registry)

    def states() -> dict[str, float | None]:
        return {
            s: registry.get_sample_value("fedq_aggregator_job_state", {"state": s})
            for s in ("idle", "running")
        }

    idle = states()
    metrics.job_running.set(1)
    running = states()

    assert idle == {"idle": 1.0, "running": 0.0}
    assert running == {"idle": 0.0, "running": 1.0}
