"""A job that cannot progress is visible: a version that is not finite is never published (the
job goes on from the last good one), a non-finite evaluation is counted and kept out of tasks,
a job without new versions is stalled."""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from batchnorm_model import REFERENCE
from known_task_key import task_id
from memory_job import (
    JOB_ID,
    TOPOLOGY,
    FakeClock,
    aggregator,
    broker_with_job,
    dead_letters,
    fedbuff_spec,
    read_history,
    send_delta,
    tasks_sent,
)
from prometheus_client import CollectorRegistry

import aggregator.state as state_module
from aggregator.service import AggregatorService
from aggregator.status import render
from broker import MemoryBroker
from broker.topology import UPDATE_ROUTING_KEY
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig
from shared.messages import Job, Update, encode_message
from shared.models import build_model, state_to_numpy

pytestmark = pytest.mark.timeout(120)


def _aggregator(
    memory: MemoryBroker, state_dir: Path, clock: FakeClock | None = None, **settings: Any
) -> tuple[AggregatorService, CollectorRegistry]:
    """memory_job's aggregator, with the registry its metrics are read from."""
    registry = CollectorRegistry()
    if clock is not None:
        settings["clock"] = clock
    return aggregator(memory, state_dir, registry=registry, **settings), registry


def _rejections(state_dir: Path) -> list[dict[str, str]]:
    path = state_dir / "jobs" / JOB_ID / "rejections.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_finite_updates_near_the_float32_limit_never_make_a_version_that_is_not_finite(
    tmp_path: Path,
) -> None:
    # Before, the float32 sum of two 3e38 deltas overflowed: the model was Inf, the job ended as
    # diverged, and every honest update after it would have been useless.
    memory, sender = broker_with_job(fedbuff_spec(buffer_size=2, max_versions=3))
    service, registry = _aggregator(memory, tmp_path)
    service.run_until_idle()

    send_delta(sender, "u1", 0, 3e38)
    send_delta(sender, "u2", 0, 3e38)
    send_delta(sender, "u3", 1, 3e38)  # 3e38 + 3e38 is past float32's 3.4e38
    for update_id in ("u4", "u5", "u6", "u7"):
        send_delta(sender, update_id, 1, -1.0)
    service.run_until_idle()

    run = tmp_path / "jobs" / JOB_ID
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "max_versions" and summary["versions"] == 3
    assert [h["update_ids"] for h in read_history(tmp_path)[1:]] == [
        ["u1", "u2"],
        ["u4", "u5"],
        ["u6", "u7"],
    ]
    assert [(r["update_id"], r["reason"]) for r in _rejections(tmp_path)] == [
        ("u3", "out_of_range")
    ]
    assert [reason for reason, _ in dead_letters(memory)] == ["out_of_range"]
    rejected = "fedq_aggregator_updates_rejected_total"
    assert registry.get_sample_value(rejected, {"reason": "out_of_range"}) == 1
    assert registry.get_sample_value("fedq_aggregator_models_nonfinite_total") == 0
    assert all(t.model.version < 3 for t in tasks_sent(memory))


def test_a_candidate_version_that_is_not_finite_is_discarded_and_the_job_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checks on updates keep a float32 model finite; the last line of defence is shown with
    # an aggregation step that makes NaN once (a bug, or a float64 model's sum overflowing).
    real_step = state_module.fedbuff_step
    calls = itertools.count()

    def nan_once(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        out = real_step(*args, **kwargs)
        if next(calls) == 0:
            out = {n: np.full_like(a, np.nan) if a.dtype.kind == "f" else a for n, a in out.items()}
        return out

    monkeypatch.setattr(state_module, "fedbuff_step", nan_once)
    memory, sender = broker_with_job(fedbuff_spec(buffer_size=2, max_versions=1))
    service, registry = _aggregator(memory, tmp_path)
    service.run_until_idle()

    with caplog.at_level(logging.WARNING, logger="aggregator.service"):
        for update_id in ("u1", "u2", "u3", "u4"):
            send_delta(sender, update_id, 0, 0.5)
        service.run_until_idle()

    run = tmp_path / "jobs" / JOB_ID
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "max_versions" and summary["versions"] == 1
    assert (summary["updates_accepted"], summary["updates_discarded"]) == (4, 2)
    assert [h["update_ids"] for h in read_history(tmp_path)] == [[], ["u3", "u4"]]
    assert [(r["update_id"], r["reason"]) for r in _rejections(tmp_path)] == [
        ("u1", "version_not_finite"),
        ("u2", "version_not_finite"),
    ]
    assert registry.get_sample_value("fedq_aggregator_versions_discarded_total") == 1
    assert registry.get_sample_value("fedq_aggregator_models_nonfinite_total") == 0
    warned = [r.message for r in caplog.records if "NaN or Inf" in r.message]
    assert len(warned) == 1 and "u1, u2" in warned[0] and "stays version 0" in warned[0]
    tasks = tasks_sent(memory)
    assert all(np.isfinite(a).all() for t in tasks for a in t.model.tensors.values())


def _bn_spec() -> JobSpec:
    return JobSpec(
        name="t",
        model=ModelSpec(REFERENCE, (1, 8, 8), 10),
        dataset="digits",
        strategy=StrategyConfig(name="fedavg"),
        stop=StopConfig(max_versions=5),
    )


def test_a_nan_evaluation_is_counted_and_left_out_of_the_history_and_the_next_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = _bn_spec()
    memory, sender = broker_with_job(spec)
    # A model of the user's own: its module must be on the aggregator's allow-list.
    service, registry = _aggregator(memory, tmp_path, allowed_modules=("batchnorm_model",))
    service.run_until_idle()
    # A worker whose BatchNorm variances are negative: finite, so accepted, but the evaluation
    # of the mean (a negative variance) is NaN.
    tensors = state_to_numpy(build_model(spec.model, seed=1, allowed_modules=["batchnorm_model"]))
    for name in tensors:
        if name.endswith("running_var"):
            tensors[name] = np.full_like(tensors[name], -1.0)
    task = task_id(JOB_ID, "w0", 0)
    update = Update(JOB_ID, "u1", "w0", task, 0, 0, "weights", 10, tensors, {"loss": 1.0}, 0.0)

    with caplog.at_level(logging.WARNING, logger="aggregator.service"):
        sender.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, encode_message(update))
        service.run_until_idle()

    history = read_history(tmp_path)
    assert [h["version"] for h in history] == [0, 1]
    assert history[1]["accuracy"] is None and history[1]["loss"] is None
    assert math.isfinite(history[0]["loss"])
    assert registry.get_sample_value("fedq_aggregator_evaluations_nonfinite_total") == 1
    assert service.status()["evaluations_nonfinite"] == 1
    assert any("evaluating version 1 gave" in r.message for r in caplog.records)
    # The task of version 1 went out, with the last finite figures (version 0's).
    tasks = tasks_sent(memory)
    assert [t.version for t in tasks] == [0, 1]
    assert tasks[1].model.metrics["loss"] == pytest.approx(history[0]["loss"])


def test_a_job_with_no_new_version_for_stall_after_s_is_stalled_until_one_comes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    memory, sender = broker_with_job(fedbuff_spec(buffer_size=2, max_versions=10))
    service, registry = _aggregator(memory, tmp_path, clock, stall_after_s=100.0)
    service.run_until_idle()
    clock.now += 99
    service.run_until_idle()
    assert service.status()["stalled"] is False

    with caplog.at_level(logging.WARNING, logger="aggregator.service"):
        clock.now += 2
        service.run_until_idle()
        clock.now += 50
        service.run_until_idle()

    status = service.status()
    assert status["stalled"] is True
    assert "no new version for 101 s (limit 100 s) at version 0" in status["stall_reason"]
    assert registry.get_sample_value("fedq_aggregator_job_stalled") == 1
    stalled = [r for r in caplog.records if "stalled" in r.message]
    assert len(stalled) == 1 and stalled[0].levelno == logging.WARNING

    send_delta(sender, "u1", 0, 0.01)
    send_delta(sender, "u2", 0, 0.01)
    service.run_until_idle()

    assert service.status()["stalled"] is False and service.status()["stall_reason"] is None
    assert registry.get_sample_value("fedq_aggregator_job_stalled") == 0


def test_a_job_is_stalled_after_five_minutes_or_three_round_deadlines_by_default(
    tmp_path: Path,
) -> None:
    service, _ = _aggregator(MemoryBroker(), tmp_path)
    short = JobSpec(strategy=StrategyConfig(round_deadline_s=60.0))
    long = JobSpec(strategy=StrategyConfig(round_deadline_s=600.0))

    assert service.stall_after(Job("a", short)) == 300.0
    assert service.stall_after(Job("b", long)) == 1800.0


def test_fedq_status_shows_a_stalled_job_and_its_reason(tmp_path: Path) -> None:
    clock = FakeClock()
    memory, _ = broker_with_job(fedbuff_spec(buffer_size=2, max_versions=10))
    service, _ = _aggregator(memory, tmp_path, clock, stall_after_s=10.0)
    service.run_until_idle()
    clock.now += 11
    service.run_until_idle()

    text = render(service.status())

    assert "STALLED        no new version for 11 s (limit 10 s) at version 0" in text
