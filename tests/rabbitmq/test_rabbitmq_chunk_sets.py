"""Updates in more chunk envelopes than the aggregator's prefetch, between real processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rabbitmq_scratch import Scratch, Spawn

from broker.topology import JOB_ROUTING_KEY
from shared.chunks import split_payload
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import Job, Update, encode_message
from shared.models import build_model, state_to_numpy

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(240)]
MODEL = ModelSpec("mlp", (1, 8, 8), 10)
CHUNK_SIZE = 2048
PREFETCH = 32  # the aggregator's default


def _envelopes_per_update() -> int:
    tensors = {name: np.zeros_like(a) for name, a in state_to_numpy(build_model(MODEL)).items()}
    update = Update("j", "u", "w", "t", 0, None, "delta", 1, tensors, sent_at=0.0)
    return len(split_payload(encode_message(update), CHUNK_SIZE))


def test_two_workers_sending_updates_in_more_envelopes_than_the_prefetch_finish_the_job(
    scratch: Scratch, tmp_path: Path, spawn: Spawn
) -> None:
    t = scratch.topology
    sender = scratch.transport()
    sender.declare()
    out = tmp_path / "run"
    spec = JobSpec(
        model=MODEL,
        dataset="digits",
        strategy=StrategyConfig(name="fedbuff", buffer_size=2, min_workers=2),
        training=TrainingConfig(max_batches=2),
        stop=StopConfig(max_versions=4),
    )
    aggregator = spawn(
        "aggregator", "aggregator", "--state-dir", str(tmp_path / "state"),
        "--output-dir", str(out), "--max-jobs", "1",
    )  # fmt: skip
    workers = []
    for i in range(2):
        workers.append(spawn(
            "worker", f"worker-{i}", "--worker-id", scratch.worker(f"w{i}"), "--dataset", "digits",
            "--num-partitions", "2", "--partition-index", str(i), "--threads", "1",
            "--chunk-size", str(CHUNK_SIZE),
        ))  # fmt: skip
    sender.publish(t.jobs, JOB_ROUTING_KEY, encode_message(Job("chunky-1", spec)))

    code = aggregator.wait(180)

    for proc in workers:
        proc.terminate()
    assert _envelopes_per_update() > PREFETCH
    assert code == 0, (tmp_path / "aggregator.log").read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == 4
    assert summary["updates_accepted"] >= 8
    assert sorted(summary["workers"]) == ["w0", "w1"]
