"""Services started in any order: a worker started before the aggregator waits for it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from rabbitmq_scratch import Scratch, Spawn

from broker.topology import JOB_ROUTING_KEY
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import Job, encode_message

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(180)]


def test_a_worker_started_before_the_aggregator_waits_for_it_then_trains(
    scratch: Scratch, tmp_path: Path, spawn: Spawn
) -> None:
    worker = spawn(
        "worker", "worker", "--worker-id", scratch.worker("w0"), "--dataset", "digits",
        "--threads", "1",
    )  # fmt: skip
    log = tmp_path / "worker.log"
    deadline = time.monotonic() + 60
    while "waiting for exchange" not in log.read_text() and time.monotonic() < deadline:
        assert worker.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)
    alive_before_aggregator = worker.poll() is None

    out = tmp_path / "run"
    aggregator = spawn(
        "aggregator", "aggregator", "--state-dir", str(tmp_path / "state"),
        "--output-dir", str(out), "--max-jobs", "1",
    )  # fmt: skip
    sender = scratch.transport()
    sender.declare()
    spec = JobSpec(
        model=ModelSpec("mlp", (1, 8, 8), 10),
        dataset="digits",
        strategy=StrategyConfig(name="fedasync"),
        training=TrainingConfig(max_batches=2),
        stop=StopConfig(max_versions=2),
    )
    sender.publish(scratch.topology.jobs, JOB_ROUTING_KEY, encode_message(Job("order-1", spec)))
    code = aggregator.wait(120)
    worker.terminate()

    assert alive_before_aggregator, log.read_text()[-3000:]
    assert code == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
    assert json.loads((out / "summary.json").read_text())["versions"] == 2
    assert "NOT_FOUND" not in log.read_text()
