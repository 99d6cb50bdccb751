"""How jobs end, on the in-process broker: cancelled (running or queued), failed, and the
updates that come after a job ended, every one accounted for in the state dir."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from memory_job import dead_letters, memory_worker
from prometheus_client import CollectorRegistry

from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker import MemoryBroker, MemoryTransport, Topology
from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import Cancel, Job, Message, Update, decode_message, encode_message

TOPOLOGY = Topology("fedq")
MODEL = ModelSpec("mlp", (1, 8, 8), 10)


def _spec(strategy: str = "fedasync", max_versions: int = 100_000, **model: Any) -> JobSpec:
    return JobSpec(
        name="t",
        model=ModelSpec(**model) if model else MODEL,
        dataset="digits",
        strategy=StrategyConfig(name=strategy, buffer_size=2),
        training=TrainingConfig(batch_size=16, lr=0.1, max_batches=2),
        stop=StopConfig(max_versions=max_versions),
        eval_every=1000,
    )


@pytest.fixture
def memory() -> MemoryBroker:
    broker = MemoryBroker()
    MemoryTransport(broker, TOPOLOGY).declare()
    return broker


def _aggregator(memory: MemoryBroker, state_dir: Path) -> AggregatorService:
    settings = AggregatorSettings(broker="memory", state_dir=str(state_dir))
    service = AggregatorService(
        MemoryTransport(memory, TOPOLOGY), settings, AggregatorMetrics(CollectorRegistry())
    )
    service.transport.subscribe(TOPOLOGY.jobs)
    service.transport.subscribe(TOPOLOGY.updates)
    return service


def _publish(memory: MemoryBroker, message: Message, exchange: str = TOPOLOGY.jobs) -> None:
    key = JOB_ROUTING_KEY if exchange == TOPOLOGY.jobs else UPDATE_ROUTING_KEY
    MemoryTransport(memory, TOPOLOGY).publish(exchange, key, encode_message(message))


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _update(job_id: str, update_id: str) -> Update:
    return Update(job_id, update_id, "w0", "t1", 0, None, "weights", 5, {"w": np.zeros(2)})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", ["fedavg", "fedbuff", "fedasync"])
def test_cancelling_a_running_job_completes_its_run_directory_and_accounts_for_every_update(
    memory: MemoryBroker, tmp_path: Path, strategy: str
) -> None:
    aggregator = _aggregator(memory, tmp_path)
    workers = [memory_worker(memory, f"w{i}") for i in range(3)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for t in threads:
        t.start()
    _publish(memory, Job("job-c", _spec(strategy)))
    while aggregator._job is None or aggregator._job.state.version < 2:
        aggregator.step(0.05)

    _publish(memory, Cancel("job-c"))
    while aggregator._job is not None:
        aggregator.step(0.05)
    for w in workers:
        w.stop()
    for t in threads:
        t.join(30)
    aggregator.run_until_idle(0.5)  # the stragglers

    out = tmp_path / "jobs" / "job-c"
    summary = json.loads((out / "summary.json").read_text())
    history = _lines(out / "history.jsonl")
    rejections = _lines(out / "rejections.jsonl")
    assert summary["stop_reason"] == "cancelled"
    assert (out / "model.safetensors").exists()
    assert summary["final_accuracy"] is not None
    assert [h["version"] for h in history] == list(range(summary["versions"] + 1))
    folded = [u for h in history for u in h["update_ids"]]
    rejected = [r["update_id"] for r in rejections]
    assert len(folded) + len(rejected) == len(set(folded + rejected))
    assert len(folded) + len(rejected) == sum(w.updates_sent for w in workers)
    late = [
        decode_message(body) for reason, body in dead_letters(memory) if reason == "job_finished"
    ]
    assert {u.update_id for u in late if isinstance(u, Update)} <= set(rejected)
    assert aggregator.status()["jobs_ended"] == {"finished": 0, "failed": 0, "cancelled": 1}


@pytest.mark.timeout(60)
def test_cancelling_a_queued_job_ends_it_cancelled_without_training(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path)
    _publish(memory, Job("first", _spec()))
    _publish(memory, Job("second", _spec()))
    aggregator.run_until_idle()
    assert aggregator.status()["queued_job_ids"] == ["second"]

    _publish(memory, Cancel("second"))
    aggregator.run_until_idle()

    status = aggregator.status()
    assert status["job_id"] == "first" and status["queued_job_ids"] == []
    assert status["jobs_ended"] == {"finished": 0, "failed": 0, "cancelled": 1}
    assert not (tmp_path / "jobs" / "second").exists()
    assert list(dead_letters(memory)) == []
    assert memory.depth(TOPOLOGY.jobs) == 0
    outcomes = _lines(tmp_path / "job-outcomes.jsonl")
    assert [(o["job_id"], o["outcome"], o["stop_reason"]) for o in outcomes] == [
        ("second", "cancelled", "cancelled")
    ]


@pytest.mark.timeout(60)
def test_a_cancelled_job_delivered_again_is_acknowledged_without_running(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path)
    _publish(memory, Job("first", _spec()))
    _publish(memory, Job("second", _spec()))
    aggregator.run_until_idle()
    _publish(memory, Cancel("second"))
    aggregator.run_until_idle()

    # What a crash between recording the cancel and acking the job would redeliver.
    _publish(memory, Job("second", _spec()))
    _publish(memory, Cancel("first"))
    aggregator.run_until_idle()

    assert aggregator._job is None and aggregator.jobs_done == 3
    assert not (tmp_path / "jobs" / "second").exists()
    assert memory.depth(TOPOLOGY.jobs) == 0


@pytest.mark.timeout(60)
def test_a_cancel_for_an_ended_or_unknown_job_is_dead_lettered_with_its_reason(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path)
    _publish(memory, Job("only", _spec()))
    aggregator.run_until_idle()
    _publish(memory, Cancel("only"))
    aggregator.run_until_idle()

    _publish(memory, Cancel("only"))
    _publish(memory, Cancel("never-submitted"))
    aggregator.run_until_idle()

    assert [reason for reason, _ in dead_letters(memory)] == ["job_finished", "unknown_job"]


@pytest.mark.timeout(60)
def test_a_cancel_or_a_job_on_the_updates_queue_is_rejected_as_unexpected_and_changes_nothing(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path)
    _publish(memory, Job("running", _spec()))
    aggregator.run_until_idle()

    _publish(memory, Cancel("running"), exchange=TOPOLOGY.updates)
    _publish(memory, Job("smuggled", _spec()), exchange=TOPOLOGY.updates)
    aggregator.run_until_idle()

    status = aggregator.status()
    assert [reason for reason, _ in dead_letters(memory)] == ["unexpected_type", "unexpected_type"]
    assert status["job_id"] == "running" and status["queued_job_ids"] == []
    assert status["jobs_ended"] == {"finished": 0, "failed": 0, "cancelled": 0}


@pytest.mark.timeout(60)
def test_a_job_that_cannot_start_is_shown_failed_with_its_reason_even_after_a_restart(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    (tmp_path / "finished-jobs.txt").write_text("from-before\n")
    aggregator = _aggregator(memory, tmp_path)
    _publish(memory, Job("typo", _spec(name="mpl", input_shape=(1, 8, 8), num_classes=10)))
    aggregator.run_until_idle()

    status = aggregator.status()
    restarted = _aggregator(memory, tmp_path).status()

    assert status["jobs_ended"] == {"finished": 1, "failed": 1, "cancelled": 0}
    [failed] = status["failed_jobs"]
    assert (failed["job_id"], failed["reason"]) == ("typo", "bad_job")
    assert "unknown model 'mpl'" in failed["detail"]
    assert restarted["jobs_ended"] == status["jobs_ended"]
    assert restarted["failed_jobs"] == status["failed_jobs"]
    assert [reason for reason, _ in dead_letters(memory)] == ["bad_job"]


@pytest.mark.timeout(60)
def test_an_update_for_an_ended_job_is_recorded_in_that_job_s_rejections_file(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path)
    _publish(memory, Job("ended", _spec()))
    aggregator.run_until_idle()
    _publish(memory, Cancel("ended"))
    aggregator.run_until_idle()

    _publish(memory, _update("ended", "late-1"), exchange=TOPOLOGY.updates)
    _aggregator(memory, tmp_path).run_until_idle()  # a restarted aggregator too
    _publish(memory, _update("ended", "late-2"), exchange=TOPOLOGY.updates)
    aggregator.run_until_idle()

    rejections = _lines(tmp_path / "jobs" / "ended" / "rejections.jsonl")
    assert [(r["update_id"], r["reason"]) for r in rejections] == [
        ("late-1", "job_finished"),
        ("late-2", "job_finished"),
    ]
    assert "cancelled" in rejections[0]["detail"]
    assert [reason for reason, _ in dead_letters(memory)] == ["job_finished", "job_finished"]


@pytest.mark.timeout(60)
def test_an_update_for_another_job_than_the_running_one_is_rejected_as_unknown_job(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path)
    _publish(memory, Job("running", _spec()))
    aggregator.run_until_idle()

    _publish(memory, _update("other", "stray"), exchange=TOPOLOGY.updates)
    aggregator.run_until_idle()

    assert aggregator._job is not None and aggregator._job.job.job_id == "running"
    assert aggregator._job.state.rejected == {}
    assert "stray" not in aggregator._job.state.seen_update_ids
    assert _lines(tmp_path / "jobs" / "running" / "rejections.jsonl") == []
    assert not (tmp_path / "jobs" / "other").exists()
    assert [reason for reason, _ in dead_letters(memory)] == ["unknown_job"]


@pytest.mark.timeout(60)
def test_a_job_that_leaves_its_model_shape_out_gets_its_evaluation_data_s(
    memory: MemoryBroker, tmp_path: Path
) -> None:
    aggregator = _aggregator(memory, tmp_path)
    worker = memory_worker(memory, "w0")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    _publish(memory, Job("shaped", _spec(max_versions=1, name="mlp")))

    while aggregator.jobs_done == 0:
        aggregator.step(0.05)
    worker.stop()
    thread.join(30)

    summary = json.loads((tmp_path / "jobs" / "shaped" / "summary.json").read_text())
    assert summary["stop_reason"] == "max_versions"
    assert summary["spec"]["model"] == {"name": "mlp", "input_shape": [1, 8, 8], "num_classes": 10}
