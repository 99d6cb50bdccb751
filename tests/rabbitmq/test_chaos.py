"""Chaos: kill and restart the aggregator, cut every broker connection, kill a worker, in one run.

In the end every update a worker published is folded into exactly one version or rejected with
a recorded reason: lost = 0 and counted twice = 0.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from rabbitmq_scratch import Scratch, Spawn

from broker.topology import JOB_ROUTING_KEY, REASON_HEADER, UPDATE_ROUTING_KEY
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import Job, Update, decode_message, encode_message

pytestmark = pytest.mark.rabbitmq
WORKERS = 3
SPEC = JobSpec(
    name="chaos",
    model=ModelSpec("mlp", (1, 8, 8), 10),
    dataset="digits",
    strategy=StrategyConfig(name="fedasync", alpha=0.5, min_workers=WORKERS),
    training=TrainingConfig(batch_size=32, lr=0.05),
    stop=StopConfig(max_versions=100_000, max_time_s=40.0),
)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def _wait_for_history(path: Path, versions: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > versions:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {versions} versions in {path} after {timeout} s")


@pytest.mark.timeout(420)
def test_chaos_loses_no_update_and_counts_none_twice(
    scratch: Scratch, tmp_path: Path, spawn: Spawn
) -> None:
    t = scratch.topology
    sender = scratch.transport()
    sender.declare()
    tap = scratch.tap(t.updates, UPDATE_ROUTING_KEY)  # a copy of every update the broker routed
    out = tmp_path / "run"
    aggregator_argv = ["--state-dir", str(tmp_path / "state"), "--output-dir", str(out)]
    aggregator_argv += ["--max-jobs", "1", "--worker-timeout", "30"]

    def worker(i: int) -> subprocess.Popen[bytes]:
        return spawn(
            "worker", f"worker-{i}", "--worker-id", scratch.worker(f"w{i}"),
            "--dataset", "digits", "--num-partitions", str(WORKERS), "--partition-index", str(i),
            "--threads", "1", "--slowdown", "4",
        )  # fmt: skip

    aggregator = spawn("aggregator", "aggregator", *aggregator_argv)
    workers = [worker(i) for i in range(WORKERS)]
    sender.publish(t.jobs, JOB_ROUTING_KEY, encode_message(Job("chaos-1", SPEC)))
    history = out / "history.jsonl"

    _wait_for_history(history, 5)
    _kill(aggregator)  # 1: the aggregator dies mid-job
    time.sleep(1.0)
    aggregator = spawn("aggregator", "aggregator", *aggregator_argv)
    _wait_for_history(history, 12)
    scratch.close_broker_connection(f"fedq {t.prefix}")  # 2: every connection cut by the broker
    _wait_for_history(history, 18)
    _kill(workers[1])  # 3: a worker dies mid-training and comes back
    time.sleep(2.0)
    workers[1] = worker(1)
    _wait_for_history(history, 24)
    _kill(aggregator)  # 4: the aggregator dies again
    aggregator = spawn("aggregator", "aggregator", *aggregator_argv)
    assert aggregator.wait(240) == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
    for proc in workers:  # a SIGTERM'd worker first sends what it was training
        proc.send_signal(signal.SIGTERM)
    for proc in workers:
        proc.wait(60)
    # Updates that arrived after the job ended are rejected as job_finished by any aggregator.
    drainer = spawn("aggregator", "aggregator", "--state-dir", str(tmp_path / "state"))
    deadline = time.monotonic() + 60
    while scratch.depth(t.updates) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2.0)
    drainer.send_signal(signal.SIGTERM)
    assert drainer.wait(30) == 0
    sender.close()

    published = {
        m.update_id
        for _, body in scratch.take_all(tap)
        if isinstance(m := decode_message(body), Update)
    }
    folded = [
        uid for line in history.read_text().splitlines() for uid in json.loads(line)["update_ids"]
    ]
    rejections = out / "rejections.jsonl"
    rejected_reasons: Counter[str] = Counter()
    rejected: set[str] = set()
    if rejections.exists():
        for line in rejections.read_text().splitlines():
            record = json.loads(line)
            rejected.add(record["update_id"])
            rejected_reasons[record["reason"]] += 1
    for properties, body in scratch.take_all(t.dead):
        message = decode_message(body)
        if isinstance(message, Update):
            rejected.add(message.update_id)
            rejected_reasons[properties.headers[REASON_HEADER]] += 1
    lost = published - set(folded) - rejected
    twice = [uid for uid, n in Counter(folded).items() if n > 1]
    summary = json.loads((out / "summary.json").read_text())
    print(
        f"\nchaos: published {len(published)}, folded {len(set(folded))} into "
        f"{summary['versions']} versions, rejected {dict(rejected_reasons)}, "
        f"lost {len(lost)}, counted twice {len(twice)}"
    )

    assert len(published) > 30
    assert lost == set()
    assert twice == []
    assert summary["versions"] >= 24


@pytest.mark.timeout(300)
def test_a_hot_standby_aggregator_takes_over_the_job_when_the_active_one_dies(
    scratch: Scratch, tmp_path: Path, spawn: Spawn
) -> None:
    t = scratch.topology
    sender = scratch.transport()
    sender.declare()
    out = tmp_path / "run"
    argv = ["--state-dir", str(tmp_path / "state"), "--output-dir", str(out), "--max-jobs", "1"]
    active = spawn("aggregator", "active", *argv)
    time.sleep(3.0)  # the first to subscribe is the active consumer of both queues
    standby = spawn("aggregator", "standby", *argv)
    workers = []
    for i in range(2):
        argv_i = ["--worker-id", scratch.worker(f"w{i}"), "--dataset", "digits"]
        argv_i += ["--num-partitions", "2", "--partition-index", str(i), "--threads", "1"]
        # Slowed down: at full speed the 16 versions can all be made before the kill below.
        argv_i += ["--slowdown", "20"]
        workers.append(spawn("worker", f"worker-{i}", *argv_i))
    spec = JobSpec(
        name="standby",
        model=SPEC.model,
        dataset="digits",
        strategy=StrategyConfig(name="fedasync", min_workers=2),
        stop=StopConfig(max_versions=16),
    )
    sender.publish(t.jobs, JOB_ROUTING_KEY, encode_message(Job("standby-1", spec)))
    _wait_for_history(out / "history.jsonl", 5)

    _kill(active)

    assert standby.wait(180) == 0, (tmp_path / "standby.log").read_text()[-3000:]
    for proc in workers:
        proc.send_signal(signal.SIGTERM)
    sender.close()
    lines = (out / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["version"] for line in lines] == list(range(17))
    assert "resumed at version" in (tmp_path / "standby.log").read_text()
