"""Federations over the real broker: separate processes, large models, long training."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from rabbitmq_scratch import Scratch

import worker.service as worker_service
from aggregator.cli import main as fedq
from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker.topology import JOB_ROUTING_KEY
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import Job, encode_message
from worker.metrics import WorkerMetrics
from worker.service import LocalData, WorkerService
from worker.settings import WorkerSettings

pytestmark = pytest.mark.rabbitmq


def _local_data(n: int = 64) -> LocalData:
    generator = torch.Generator().manual_seed(0)
    return LocalData(torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,)))


def _services(
    scratch: Scratch, tmp_path: Path, spec: JobSpec, url: str | None = None, slowdown: float = 1.0
) -> tuple[AggregatorService, WorkerService]:
    # bigmodel (a module of these tests) is the one model module the services may import.
    settings = AggregatorSettings(
        broker=scratch.url, state_dir=str(tmp_path), max_jobs=1, allowed_modules=("bigmodel",)
    )
    aggregator = AggregatorService(
        scratch.transport(), settings, AggregatorMetrics(CollectorRegistry())
    )
    aggregator.transport.declare()
    worker_id = scratch.worker("w0")
    worker = WorkerService(
        scratch.transport(url),
        WorkerSettings(
            worker_id=worker_id,
            slowdown=slowdown,
            hello_interval_s=1.0,
            allowed_modules=("bigmodel",),
        ),
        _local_data(),
        torch.device("cpu"),
        WorkerMetrics(CollectorRegistry()),
    )
    aggregator.transport.publish(
        scratch.topology.jobs, JOB_ROUTING_KEY, encode_message(Job("job-1", spec))
    )
    return aggregator, worker


def _run(aggregator: AggregatorService, worker: WorkerService) -> None:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    aggregator.run()
    worker.stop()
    thread.join(60)


@pytest.mark.timeout(300)
def test_fedq_run_trains_over_rabbitmq_with_every_service_in_its_own_process(
    amqp_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"

    code = fedq(
        [
            "run", "--broker", amqp_url, "--workers", "2", "--model", "cnn",
            "--dataset", "digits", "--strategy", "fedavg", "--max-versions", "3",
            "--out", str(out), "--quiet",
        ]
    )  # fmt: skip

    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert summary["versions"] == 3 and summary["updates_accepted"] == 6
    assert summary["final_accuracy"] > history[0]["accuracy"] + 0.3
    assert sorted(summary["workers"]) == ["w0", "w1"]


@pytest.mark.timeout(300)
def test_fedq_run_over_rabbitmq_allows_its_processes_the_model_module_its_user_named(
    amqp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The separate services import batchnorm_model (of tests/) only because `fedq run` passes
    # them --allow-module: their own allowed_modules is empty.
    tests = str(Path(__file__).parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("FEDQ_ALLOWED_MODULES", raising=False)
    out = tmp_path / "run"

    code = fedq(
        [
            "run", "--broker", amqp_url, "--workers", "2", "--model", "batchnorm_model:digits_bn",
            "--dataset", "digits", "--strategy", "fedavg", "--max-versions", "1",
            "--out", str(out), "--quiet",
        ]
    )  # fmt: skip

    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == 1 and summary["updates_accepted"] == 2


@pytest.mark.timeout(240)
def test_a_model_over_64_mb_crosses_the_broker_both_ways_in_chunks(
    scratch: Scratch, tmp_path: Path
) -> None:
    spec = JobSpec(
        model=ModelSpec("bigmodel:build", (1, 8, 8), 10),
        dataset="digits",
        strategy=StrategyConfig(name="fedasync"),
        training=TrainingConfig(max_batches=1, batch_size=8, lr=0.01),
        stop=StopConfig(max_versions=1),
    )
    aggregator, worker = _services(scratch, tmp_path, spec)

    _run(aggregator, worker)

    summary = json.loads((tmp_path / "jobs" / "job-1" / "summary.json").read_text())
    assert summary["versions"] == 1 and summary["updates_accepted"] == 1
    assert summary["bytes_received"] > 64e6 and summary["bytes_sent"] > 64e6
    assert (tmp_path / "jobs" / "job-1" / "model.safetensors").stat().st_size > 64e6


@pytest.mark.timeout(120)
def test_a_worker_training_longer_than_two_heartbeat_intervals_keeps_its_connection(
    scratch: Scratch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = JobSpec(
        model=ModelSpec("mlp", (1, 8, 8), 10),
        dataset="digits",
        strategy=StrategyConfig(name="fedasync"),
        training=TrainingConfig(max_batches=1),
        stop=StopConfig(max_versions=1),
    )

    real_train = worker_service.train

    def long_training(*args: Any, **kwargs: Any) -> tuple[int, dict[str, float]]:
        time.sleep(4.0)  # four heartbeat intervals of one second
        return real_train(*args, **kwargs)

    monkeypatch.setattr(worker_service, "train", long_training, raising=True)
    aggregator, worker = _services(scratch, tmp_path, spec, url=scratch.url_with(heartbeat=1))

    _run(aggregator, worker)

    summary = json.loads((tmp_path / "jobs" / "job-1" / "summary.json").read_text())
    assert summary["updates_accepted"] == 1
    assert worker.metrics.training_duration._sum.get() >= 4.0
    assert worker.transport.reconnects == 0  # type: ignore[attr-defined]
