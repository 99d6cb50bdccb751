"""A user's BatchNorm model on the digits, three non-IID sites (Dirichlet 0.5), on the
in-process broker: every strategy reaches 95% test accuracy, every evaluation stays finite, and
no worker refuses a task (issue 9: FedBuff drove running_var negative by version 2).
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest
from batchnorm_model import REFERENCE
from prometheus_client import CollectorRegistry

from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker import MemoryBroker, MemoryTransport, Topology
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig
from shared.messages import Job, encode_message
from worker.cli import build_worker
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(240)

SITES = 3
TARGET = 0.95
MODULE = REFERENCE.partition(":")[0]


def _federate(strategy: str, out: Path) -> dict[str, Any]:
    """Run one job to the target (or its limits); return its summary, its history, the number
    of tasks the workers refused or failed and of the aggregator's non-finite evaluations."""
    spec = JobSpec(
        name="bn",
        model=ModelSpec(REFERENCE, (1, 8, 8), 10),
        dataset="digits",
        strategy=StrategyConfig(name=strategy, min_workers=SITES),
        # max_time is the guard of a job that never gets there, not a timed assertion.
        stop=StopConfig(max_versions=150, target_accuracy=TARGET, max_time_s=150),
        seed=0,
    )
    memory, topology = MemoryBroker(), Topology("fedq")
    transport = MemoryTransport(memory, topology)
    aggregator_registry = CollectorRegistry()
    aggregator = AggregatorService(
        transport,
        # The model is a user's own: both services must allow its module.
        AggregatorSettings(
            broker="memory",
            output_dir=str(out),
            max_jobs=1,
            state_dir=str(out),
            allowed_modules=(MODULE,),
        ),
        AggregatorMetrics(aggregator_registry),
    )
    transport.declare()
    registries = [CollectorRegistry() for _ in range(SITES)]
    workers = [
        build_worker(
            WorkerSettings(
                worker_id=f"w{i}",
                broker="memory",
                dataset="digits",
                partition="dirichlet:0.5",
                num_partitions=SITES,
                partition_index=i,
                partition_seed=0,
                seed=i,
                device="cpu",
                hello_interval_s=1.0,
                allowed_modules=(MODULE,),
            ),
            memory=memory,
            registry=registries[i],
        )
        for i in range(SITES)
    ]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for t in threads:
        t.start()
    transport.publish(topology.jobs, "job", encode_message(Job("bn", spec)))
    try:
        aggregator.run()
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(60)
    failed = sum(
        sample.value
        for registry in registries
        for metric in registry.collect()
        if metric.name == "fedq_worker_tasks_failed"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    return {
        "summary": json.loads((out / "summary.json").read_text()),
        "history": [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()],
        "tasks_failed": failed,
        "evaluations_nonfinite": aggregator_registry.get_sample_value(
            "fedq_aggregator_evaluations_nonfinite_total"
        ),
    }


@pytest.mark.parametrize("strategy", ["fedavg", "fedbuff", "fedasync"])
def test_a_batchnorm_model_on_three_non_iid_sites_reaches_95_percent(
    strategy: str, tmp_path: Path
) -> None:
    run = _federate(strategy, tmp_path)

    summary = run["summary"]
    assert summary["stop_reason"] == "target_accuracy", summary
    assert summary["reached_target"] and summary["best_accuracy"] >= TARGET


def test_a_fedbuff_batchnorm_job_keeps_every_evaluation_finite_and_every_task_valid(
    tmp_path: Path,
) -> None:
    run = _federate("fedbuff", tmp_path)

    # Before the buffer rule, version 2's running_var was negative: its loss NaN, every task
    # refused by every worker (their tasks_failed), and the job idle until max_time.
    assert run["evaluations_nonfinite"] == 0
    evaluated = [h["loss"] for h in run["history"] if h["loss"] is not None]
    assert len(evaluated) >= 2 and all(math.isfinite(loss) for loss in evaluated)
    assert run["tasks_failed"] == 0
    assert run["summary"]["stop_reason"] == "target_accuracy"
