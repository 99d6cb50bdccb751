"""A hello or an update from a worker id that has no task queue does not stop the aggregator."""

from __future__ import annotations

from pathlib import Path

import pytest
from memory_job import (
    TOPOLOGY,
    aggregator,
    broker_with_job,
    fedbuff_spec,
    read_history,
    send_delta,
)

from broker.topology import UPDATE_ROUTING_KEY
from shared.messages import Hello, encode_message

pytestmark = pytest.mark.timeout(60)


def test_a_hello_from_a_worker_without_a_task_queue_is_counted_and_the_job_goes_on(
    tmp_path: Path,
) -> None:
    memory, sender = broker_with_job(fedbuff_spec(buffer_size=1, max_versions=3))
    service = aggregator(memory, tmp_path)
    service.run_until_idle()

    sender.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, encode_message(Hello("ghost", 5, "cpu")))
    service.run_until_idle()  # its task is unroutable: before the fix this raised PublishError
    send_delta(sender, "u1", 0, 0.01)
    send_delta(sender, "u2", 1, 0.01)
    service.run_until_idle()

    failures = service.metrics.worker_failures.labels("no_task_queue")._value.get()
    failed = {w["worker_id"]: w["reason"] for w in service.status()["failed_workers"]}
    assert failures == 1
    assert failed == {"ghost": "no_task_queue"}
    assert [h["update_ids"] for h in read_history(tmp_path)[1:]] == [["u1"], ["u2"]]
