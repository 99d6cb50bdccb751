"""A worker whose data does not fit the model, as real processes over RabbitMQ: it refuses the
task with a failure message instead of a traceback every few seconds, and the aggregator counts
it, shows it in /status and stops sending it tasks."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rabbitmq_scratch import Scratch, Spawn

from broker.topology import JOB_ROUTING_KEY
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import Job, encode_message

pytestmark = pytest.mark.rabbitmq
MISMATCH = "local images are 3x8x8 but the model takes 1x8x8"
SPEC = JobSpec(
    name="mismatch",
    model=ModelSpec("mlp", (1, 8, 8), 10),
    dataset="digits",
    strategy=StrategyConfig(name="fedasync"),
    training=TrainingConfig(batch_size=16, max_batches=2),
    stop=StopConfig(max_versions=100_000, max_time_s=120.0),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return str(response.read().decode())
    except (OSError, urllib.error.URLError):
        return None


def _wait_for_failure(base: str, timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = _get(base + "/status")
        status = json.loads(body) if body else {}
        if status.get("failed_workers"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"no failed worker in {base}/status after {timeout} s")


@pytest.mark.timeout(240)
def test_a_worker_whose_images_do_not_fit_is_reported_and_counted_by_the_aggregator(
    scratch: Scratch, tmp_path: Path, spawn: Spawn
) -> None:
    data = tmp_path / "rgb.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), y=np.arange(40) % 10)
    port = _free_port()
    sender = scratch.transport()
    sender.declare()
    aggregator = spawn(
        "aggregator", "aggregator", "--state-dir", str(tmp_path / "state"),
        "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
    )  # fmt: skip
    worker = spawn(
        "worker", "worker", "--worker-id", scratch.worker("rgb-site"), "--data", str(data),
        "--threads", "1",
    )  # fmt: skip
    sender.publish(scratch.topology.jobs, JOB_ROUTING_KEY, encode_message(Job("mm-1", SPEC)))

    status = _wait_for_failure(f"http://127.0.0.1:{port}")
    time.sleep(6.0)  # a hello interval and more: the worker stays idle, with no task
    metrics = _get(f"http://127.0.0.1:{port}/metrics") or ""
    status_after = json.loads(_get(f"http://127.0.0.1:{port}/status") or "{}")
    aggregator.terminate()
    worker.terminate()
    aggregator.wait(30)
    worker.wait(30)

    assert status["failed_workers"] == [
        {"worker_id": "rgb-site", "reason": "data_mismatch", "detail": MISMATCH}
    ]
    assert status_after["state"] == "running" and status_after["version"] == 0
    assert 'fedq_aggregator_worker_failures_total{reason="data_mismatch"} 1.0' in metrics
    assert "fedq_aggregator_workers_active 0.0" in metrics
    worker_log = (tmp_path / "worker.log").read_text()
    assert worker_log.count(MISMATCH) == 1
    assert "Traceback" not in worker_log
    assert MISMATCH in (tmp_path / "aggregator.log").read_text()
