"""A hostile site on a real RabbitMQ, with the least-privilege account `fedq broker add-worker`
makes: what it sends must not stop the aggregator, and honest sites' training goes on.

The aggregator and the honest worker are separate processes, each with its own account, on a
throw-away vhost; the hostile site publishes by hand with its own account.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
from rabbitmq_scratch import PASSWORD, Vhost

from broker.rabbitmq import RabbitMQTransport
from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import Hello, Job, encode_message

pytestmark = pytest.mark.rabbitmq
SPEC = JobSpec(
    name="hostile-site",
    model=ModelSpec("mlp", (1, 8, 8), 10),
    dataset="digits",
    strategy=StrategyConfig(name="fedasync", alpha=0.5),
    training=TrainingConfig(batch_size=16, max_batches=2),
    stop=StopConfig(max_versions=100_000, max_time_s=120.0),
)


class Start(Protocol):
    def __call__(
        self, service: str, log: str, url: str, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]: ...


@pytest.fixture
def start(vhost: Vhost, tmp_path: Path) -> Iterator[Start]:
    """Start `python -m SERVICE` on the vhost with the given account's URL; kill it afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def run(
        service: str, log: str, url: str, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        common = ["--broker", url, "--prefix", vhost.topology.prefix, "--log-level", "INFO"]
        with open(tmp_path / f"{log}.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", service, *common, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=os.environ | (env or {}),
            )
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return str(response.read().decode())
    except (OSError, urllib.error.URLError):
        return ""


def _wait_for_version(base: str, version: int, timeout: float = 120.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        body = _get(base + "/status")
        status = json.loads(body) if body else {}
        if isinstance(status.get("version"), int) and int(str(status["version"])) >= version:
            return status
        time.sleep(0.5)
    raise AssertionError(f"no version {version} at {base}/status after {timeout} s: {status}")


def _site(vhost: Vhost, name: str) -> RabbitMQTransport:
    """A site's own connection, as `fedq broker add-worker` allows it."""
    return vhost.site(name)


def _honest_worker(start: Start, vhost: Vhost, name: str) -> subprocess.Popen[bytes]:
    return start(
        "worker", name, vhost.url(name, PASSWORD), "--worker-id", name, "--dataset", "digits",
        "--num-partitions", "2", "--partition-index", "0", "--threads", "1",
        env={"FEDQ_STAMP_USER_ID": "true", "FEDQ_DECLARE_TOPOLOGY": "false"},
    )  # fmt: skip


@pytest.mark.timeout(300)
def test_a_hello_for_a_worker_with_no_task_queue_is_a_fact_about_that_worker_not_a_crash(
    vhost: Vhost, start: Start, tmp_path: Path
) -> None:
    honest = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    hostile = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    port = _free_port()
    admin = vhost.transport()
    admin.declare()
    aggregator = start(
        "aggregator", "aggregator", vhost.url(), "--state-dir", str(tmp_path / "state"),
        "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
    )  # fmt: skip
    admin.publish(vhost.topology.jobs, JOB_ROUTING_KEY, encode_message(Job("ghost-1", SPEC)))
    site = _site(vhost, hostile)
    # Not checked against user_id without require_user_id: any id, here one with no task queue.
    site.publish(
        vhost.topology.updates, UPDATE_ROUTING_KEY, encode_message(Hello("ghost", 5, "cpu"))
    )
    worker = _honest_worker(start, vhost, honest)

    status = _wait_for_version(f"http://127.0.0.1:{port}", 3)
    metrics = _get(f"http://127.0.0.1:{port}/metrics")
    alive = aggregator.poll() is None
    aggregator.terminate()
    worker.terminate()
    aggregator.wait(30)
    worker.wait(30)

    assert alive, (tmp_path / "aggregator.log").read_text()[-3000:]
    assert {"worker_id": "ghost", "reason": "no_task_queue"}.items() <= next(
        w
        for w in status["failed_workers"]
        if w["worker_id"] == "ghost"  # type: ignore[attr-defined]
    ).items()
    assert 'fedq_aggregator_worker_failures_total{reason="no_task_queue"} 1.0' in metrics
