"""`fedq status` against a running aggregator's HTTP endpoint (/metrics and /status)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from aggregator.cli import main
from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker import MemoryBroker, MemoryTransport, Topology
from broker.topology import JOB_ROUTING_KEY
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import Job, encode_message
from shared.ops import MetricsServer
from worker.metrics import WorkerMetrics
from worker.service import LocalData, WorkerService
from worker.settings import WorkerSettings

TOPOLOGY = Topology("fedq")


def _worker(memory: MemoryBroker, worker_id: str) -> WorkerService:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (64,), generator=generator)
    return WorkerService(
        MemoryTransport(memory, TOPOLOGY),
        WorkerSettings(worker_id=worker_id, broker="memory"),
        LocalData(x, y),
        torch.device("cpu"),
        WorkerMetrics(CollectorRegistry()),
    )


def _job(job_id: str) -> Job:
    spec = JobSpec(
        name="t",
        model=ModelSpec("mlp", (1, 8, 8), 10),
        dataset="digits",
        strategy=StrategyConfig(name="fedasync"),
        training=TrainingConfig(batch_size=16, lr=0.1),
        # Long enough to be running while the test looks.
        stop=StopConfig(max_versions=100_000, max_time_s=60),
    )
    return Job(job_id, spec)


@pytest.mark.timeout(120)
def test_status_shows_the_running_job_version_accuracy_and_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    memory = MemoryBroker()
    client = MemoryTransport(memory, TOPOLOGY)
    client.declare()
    settings = AggregatorSettings(broker="memory", state_dir=str(tmp_path))
    aggregator = AggregatorService(
        MemoryTransport(memory, TOPOLOGY),
        settings,
        AggregatorMetrics(registry := CollectorRegistry()),
    )
    workers = [_worker(memory, f"w{i}") for i in range(2)]
    with contextlib.ExitStack() as stack:
        server = MetricsServer(
            registry, aggregator.health, "127.0.0.1", 0, timeout_s=60.0, status=aggregator.status
        )
        server.start()
        stack.callback(server.close)
        url = f"http://127.0.0.1:{server.port}"
        client.publish(TOPOLOGY.jobs, JOB_ROUTING_KEY, encode_message(_job("job-a")))
        client.publish(TOPOLOGY.jobs, JOB_ROUTING_KEY, encode_message(_job("job-b")))
        threads = [threading.Thread(target=s.run, daemon=True) for s in (aggregator, *workers)]
        for t in threads:
            t.start()
        for s in (aggregator, *workers):
            stack.callback(s.stop)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with urllib.request.urlopen(url + "/status", timeout=5) as response:
                seen = json.loads(response.read())
            if (seen["version"] or 0) >= 2:
                break
            time.sleep(0.1)
        capsys.readouterr()

        code = main(["status", "--aggregator", url, "--json"])
        out = capsys.readouterr().out
        assert main(["status", "--aggregator", url]) == 0
        block = capsys.readouterr().out
    for t in threads:
        t.join(30)

    assert code == 0
    status = json.loads(out)
    assert status["state"] == "running"
    assert status["job_id"] == "job-a"
    assert status["strategy"] == "fedasync" and status["model"] == "mlp"
    assert status["version"] >= 2
    assert 0.0 <= status["accuracy"] <= 1.0
    assert status["workers_active"] == 2
    assert status["queued_jobs"] == 1 and status["queued_job_ids"] == ["job-b"]
    assert status["updates_accepted_total"] >= 2
    assert status["last_model_age_s"] >= 0
    assert "job            job-a (fedasync, mlp)" in block
    assert "workers active 2" in block


def test_status_of_an_unreachable_aggregator_is_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    assert main(["status", "--aggregator", f"http://127.0.0.1:{port}", "--json"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fedq status: cannot reach the aggregator at http://127.0.0.1:")


def test_status_rejects_a_broker_url_that_is_not_amqp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = CollectorRegistry()
    AggregatorMetrics(registry)
    settings = AggregatorSettings(broker="memory", state_dir=str(tmp_path))
    service = AggregatorService(
        MemoryTransport(MemoryBroker(), TOPOLOGY), settings, AggregatorMetrics(CollectorRegistry())
    )
    server = MetricsServer(registry, service.health, "127.0.0.1", 0, 60.0, status=service.status)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        assert main(["status", "--aggregator", url, "--broker", "memory"]) == 1
        assert "amqp://" in capsys.readouterr().err
        assert main(["status", "--aggregator", url, "--json"]) == 0
        idle = json.loads(capsys.readouterr().out)
    finally:
        server.close()
    assert idle["state"] == "idle" and idle["job_id"] is None and idle["queued_jobs"] == 0


def test_an_idle_aggregator_shows_no_version_or_accuracy_of_its_previous_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = CollectorRegistry()
    metrics = AggregatorMetrics(registry)
    settings = AggregatorSettings(broker="memory", state_dir=str(tmp_path))
    service = AggregatorService(MemoryTransport(MemoryBroker(), TOPOLOGY), settings, metrics)
    # What the gauges still hold after a job ended at version 41 with a diverged loss.
    metrics.model_version.set(41)
    metrics.eval_accuracy.set(0.5)
    metrics.eval_loss.set(float("nan"))
    server = MetricsServer(registry, service.health, "127.0.0.1", 0, 60.0, status=service.status)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        assert main(["status", "--aggregator", url, "--json"]) == 0
        text = capsys.readouterr().out
        assert main(["status", "--aggregator", url]) == 0
        block = capsys.readouterr().out
    finally:
        server.close()

    idle = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in --json"))
    assert (idle["state"], idle["job_id"], idle["version"], idle["accuracy"]) == (
        "idle",
        None,
        None,
        None,
    )
    assert "job            -\n" in block and "version        -\n" in block
    # Not the first line: the aggregator's URL has a random port, which may hold "41".
    assert "41" not in block.split("\n", 1)[1]
