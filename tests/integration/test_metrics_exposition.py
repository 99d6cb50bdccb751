"""Both services' /metrics after a real job: promtool accepts them, every listed metric is there."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker import MemoryBroker, MemoryTransport, Topology
from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import Hello, Job, encode_message
from shared.ops import MetricsServer
from worker.metrics import WorkerMetrics
from worker.service import LocalData, WorkerService
from worker.settings import WorkerSettings

TOPOLOGY = Topology("fedq")

# What the issue asks each service to expose, with the type each must have.
AGGREGATOR_METRICS = {
    "fedq_aggregator_updates_received_total": "counter",
    "fedq_aggregator_updates_accepted_total": "counter",
    "fedq_aggregator_updates_rejected_total": "counter",
    "fedq_aggregator_update_staleness": "histogram",
    "fedq_aggregator_update_size_bytes": "histogram",
    "fedq_aggregator_aggregation_duration_seconds": "histogram",
    "fedq_aggregator_model_version": "gauge",
    "fedq_aggregator_round": "gauge",
    "fedq_aggregator_eval_accuracy_ratio": "gauge",
    "fedq_aggregator_eval_loss": "gauge",
    "fedq_aggregator_workers_active": "gauge",
    "fedq_aggregator_last_model_timestamp_seconds": "gauge",
    "fedq_aggregator_last_model_age_seconds": "gauge",
    "fedq_aggregator_job_state": "gauge",
}
WORKER_METRICS = {
    "fedq_worker_tasks_received_total": "counter",
    "fedq_worker_tasks_completed_total": "counter",
    "fedq_worker_tasks_failed_total": "counter",
    "fedq_worker_training_duration_seconds": "histogram",
    "fedq_worker_samples_trained_total": "counter",
    "fedq_worker_last_loss": "gauge",
    "fedq_worker_last_accuracy_ratio": "gauge",
    "fedq_worker_sent_bytes_total": "counter",
    "fedq_worker_received_bytes_total": "counter",
    "fedq_worker_device_info": "gauge",
    "fedq_worker_phase_seconds_total": "counter",
}


def _promtool() -> str:
    """The promtool binary; missing fails the test under CI=true and skips it elsewhere."""
    path = shutil.which("promtool")
    if path is None:
        why = "promtool is not installed (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; CI=true needs it", pytrace=False)
        pytest.skip(f"{why}; skipped outside CI, with CI=true this fails")
    return path


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def _types(exposition: str) -> dict[str, str]:
    """{metric name: type} from the # TYPE lines."""
    return {
        line.split()[2]: line.split()[3]
        for line in exposition.splitlines()
        if line.startswith("# TYPE ")
    }


def _samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def _worker(memory: MemoryBroker, worker_id: str, registry: CollectorRegistry) -> WorkerService:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (64,), generator=generator)
    return WorkerService(
        MemoryTransport(memory, TOPOLOGY),
        WorkerSettings(worker_id=worker_id, broker="memory"),
        LocalData(x, y),
        torch.device("cpu"),
        WorkerMetrics(registry),
    )


def _job() -> Job:
    spec = JobSpec(
        name="t",
        model=ModelSpec("mlp", (1, 8, 8), 10),
        dataset="digits",
        strategy=StrategyConfig(name="fedasync"),
        training=TrainingConfig(batch_size=16, lr=0.1),
        stop=StopConfig(max_versions=3),
    )
    return Job("job-1", spec)


@pytest.mark.timeout(120)
def test_both_expositions_pass_promtool_and_hold_every_metric_the_issue_lists(
    tmp_path: Path,
) -> None:
    promtool = _promtool()
    memory = MemoryBroker()
    client = MemoryTransport(memory, TOPOLOGY)
    client.declare()
    registries = [CollectorRegistry() for _ in range(3)]
    settings = AggregatorSettings(broker="memory", state_dir=str(tmp_path), max_jobs=1)
    aggregator = AggregatorService(
        MemoryTransport(memory, TOPOLOGY), settings, AggregatorMetrics(registries[0])
    )
    workers = [_worker(memory, f"w{i}", registries[1 + i]) for i in range(2)]
    services: list[AggregatorService | WorkerService] = [aggregator, *workers]
    with contextlib.ExitStack() as stack:
        urls = []
        for registry, service in zip(registries, services, strict=True):
            server = MetricsServer(registry, service.health, "127.0.0.1", 0, timeout_s=60.0)
            server.start()
            stack.callback(server.close)
            urls.append(f"http://127.0.0.1:{server.port}")
        # Something to reject on either side, so that the labelled counters have a series.
        client.declare_worker("w0")
        client.publish(TOPOLOGY.tasks, "w0", b"not msgpack")
        client.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, b"not msgpack")
        threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
        for t in threads:
            t.start()
        client.publish(TOPOLOGY.jobs, JOB_ROUTING_KEY, encode_message(_job()))

        aggregator.run()
        scraped = [_get(url + "/metrics") for url in urls]
        healthz = [_get(url + "/healthz") for url in urls]
        for w in workers:
            w.stop()
        for t in threads:
            t.join(30)

    for status, exposition in scraped:
        assert status == 200
        checked = subprocess.run(
            [promtool, "check", "metrics"],
            input=exposition,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")
    aggregator_text, worker_text = scraped[0][1], scraped[1][1]
    assert _types(aggregator_text).items() >= AGGREGATOR_METRICS.items()
    assert _types(worker_text).items() >= WORKER_METRICS.items()
    agg, w0 = _samples(aggregator_text), _samples(worker_text)
    assert agg[("fedq_aggregator_model_version", frozenset())] == 3
    assert agg[("fedq_aggregator_updates_accepted_total", frozenset())] >= 3
    malformed = frozenset({("reason", "malformed")})
    assert agg[("fedq_aggregator_updates_rejected_total", malformed)] == 1
    assert agg[("fedq_aggregator_job_state", frozenset({("state", "idle")}))] == 1
    assert agg[("fedq_aggregator_job_state", frozenset({("state", "running")}))] == 0
    assert 0 <= agg[("fedq_aggregator_last_model_age_seconds", frozenset())] < 60
    assert agg[("fedq_aggregator_workers_active", frozenset())] == 2
    assert w0[("fedq_worker_tasks_failed_total", malformed)] == 1
    assert w0[("fedq_worker_device_info", frozenset({("device", "cpu")}))] == 1
    assert w0[("fedq_worker_samples_trained_total", frozenset())] > 0
    assert w0[("fedq_worker_sent_bytes_total", frozenset())] > 0
    for status, body in healthz:
        assert status == 200 and json.loads(body)["status"] == "ok"


@pytest.mark.timeout(30)
def test_workers_that_go_silent_drop_out_of_workers_active(tmp_path: Path) -> None:
    memory = MemoryBroker()
    client = MemoryTransport(memory, TOPOLOGY)
    client.declare()
    now = [0.0]
    registry = CollectorRegistry()
    settings = AggregatorSettings(broker="memory", state_dir=str(tmp_path), worker_timeout_s=10)
    aggregator = AggregatorService(
        MemoryTransport(memory, TOPOLOGY), settings, AggregatorMetrics(registry), lambda: now[0]
    )
    aggregator.transport.subscribe(TOPOLOGY.updates)
    for worker_id in ("w0", "w1"):
        hello = encode_message(Hello(worker_id, 10, "cpu"))
        client.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, hello)

    aggregator.run_until_idle(0.05)
    now[0] += 5
    aggregator.step(0)
    heard = registry.get_sample_value("fedq_aggregator_workers_active")
    now[0] += 10
    aggregator.step(0)
    silent = registry.get_sample_value("fedq_aggregator_workers_active")

    assert (heard, silent) == (2, 0)


@pytest.mark.timeout(10)
def test_a_missing_promtool_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true needs it"):
        _promtool()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="with CI=true this fails"):
        _promtool()
