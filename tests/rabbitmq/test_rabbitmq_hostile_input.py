"""Through a real broker: every kind of hostile update is dead-lettered with its reason, counted
and logged once, and the model is bit-identical to the one the valid updates alone make."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hostile_input import MAX_MESSAGE_BYTES, WORKERS, Case, job, sequence
from known_task_key import use_known_key
from prometheus_client import CollectorRegistry
from rabbitmq_scratch import Scratch
from safetensors.numpy import load_file

from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker.rabbitmq import RabbitMQTransport
from broker.topology import JOB_ROUTING_KEY, REASON_HEADER, SOURCE_HEADER, UPDATE_ROUTING_KEY
from shared.messages import encode_message

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(180)]


class _Aggregator:
    """An aggregator service on its own RabbitMQ connection, with its metrics registry."""

    def __init__(self, scratch: Scratch, state_dir: Path) -> None:
        self.registry = CollectorRegistry()
        transport = scratch.transport()
        # Incomplete chunk sets are dead-lettered once they are this old; long enough that a
        # valid set is never cut while its chunks are still on the way.
        settings = AggregatorSettings(
            broker=scratch.url,
            state_dir=str(use_known_key(state_dir)),
            max_message_bytes=MAX_MESSAGE_BYTES,
            chunk_max_age_s=1.0,
        )
        self.service = AggregatorService(transport, settings, AggregatorMetrics(self.registry))
        self.transport: RabbitMQTransport = transport
        self.state_dir = state_dir
        transport.declare()
        transport.subscribe(scratch.topology.jobs)
        transport.subscribe(scratch.topology.updates)

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def rejected(self, reason: str) -> float:
        return self.value("fedq_aggregator_updates_rejected_total", reason=reason)

    def accepted(self) -> float:
        return self.value("fedq_aggregator_updates_accepted_total")

    def drive(self, until: Callable[[], bool], timeout: float = 30.0) -> None:
        """Step until the condition holds, then until idle (to see anything done twice)."""
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "the aggregator did not get there in time"
            self.service.step(0.05)
        self.service.run_until_idle(idle_s=0.3)

    def model(self) -> dict:
        return load_file(self.state_dir / "jobs" / "hostile-1" / "model.safetensors")


def _start(scratch: Scratch, state_dir: Path) -> tuple[_Aggregator, RabbitMQTransport]:
    aggregator = _Aggregator(scratch, state_dir)
    sender = scratch.transport()
    for worker in WORKERS:
        sender.declare_worker(scratch.worker(worker))
    sender.publish(scratch.topology.jobs, JOB_ROUTING_KEY, encode_message(job()))
    # Updates go out once the job runs: before, they would be rejected as unknown_job.
    aggregator.drive(lambda: aggregator.value("fedq_aggregator_job_running") == 1)
    return aggregator, sender


def _publish(sender: RabbitMQTransport, scratch: Scratch, case: Case) -> None:
    for part in case.parts:
        sender.publish(scratch.topology.updates, UPDATE_ROUTING_KEY, part)


def _own_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.INFO and r.name.split(".")[0] in ("aggregator", "broker")
    ]


def test_hostile_updates_over_rabbitmq_are_rejected_and_leave_the_model_as_the_valid_ones_make_it(
    scratch: Scratch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    hostile, sender = _start(scratch, tmp_path / "hostile")
    dead_queue = scratch.topology.dead
    observed: dict[str, list[str]] = {}
    valid_seen = 0

    for case in sequence():
        caplog.clear()
        rejected_before = hostile.rejected(case.reason)
        _publish(sender, scratch, case)
        if case.valid:
            valid_seen += 1
            hostile.drive(lambda n=valid_seen: hostile.accepted() == n)
            assert scratch.depth(dead_queue) == 0, case.name
            continue
        hostile.drive(lambda c=case: scratch.depth(dead_queue) >= len(c.dead))
        taken = scratch.take_all(dead_queue)
        observed[case.name] = sorted({p.headers[REASON_HEADER] for p, _ in taken})
        lines = _own_lines(caplog)

        assert Counter(body for _, body in taken) == Counter(case.dead), case.name
        assert {p.headers[SOURCE_HEADER] for p, _ in taken} == {scratch.topology.updates}
        assert hostile.rejected(case.reason) == rejected_before + 1, case.name
        assert len(lines) == 1, f"{case.name} logged {len(lines)} times: {lines}"

    assert observed == {c.name: [c.reason] for c in sequence() if not c.valid}
    assert hostile.service.jobs_done == 1
    assert scratch.depth(scratch.topology.updates) == 0

    hostile.transport.close()  # the updates queue has a single active consumer: hand it over
    clean, clean_sender = _start(scratch, tmp_path / "clean")
    valid = [case for case in sequence() if case.valid]
    for case in valid:
        _publish(clean_sender, scratch, case)
    clean.drive(lambda: clean.service.jobs_done == 1)

    with_bad, without = hostile.model(), clean.model()
    assert list(with_bad) == list(without)
    assert all(with_bad[n].tobytes() == without[n].tobytes() for n in without)
    assert clean.accepted() == len(valid) and scratch.depth(dead_queue) == 0
