"""Hostile and malformed updates are each rejected with a reason, dead-lettered, counted and
logged once; the aggregator goes on, and its model is the one the valid updates alone make."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import pytest
from hostile_input import (
    INITIAL,
    MAX_MESSAGE_BYTES,
    WORKERS,
    Case,
    dead_letters,
    job,
    rejected_reasons,
    sequence,
)
from known_task_key import use_known_key
from prometheus_client import CollectorRegistry
from safetensors.numpy import load_file

from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker import MemoryBroker, MemoryTransport, Topology
from broker.topology import JOB_ROUTING_KEY, REASON_HEADER, SOURCE_HEADER, UPDATE_ROUTING_KEY
from shared.messages import encode_message

pytestmark = pytest.mark.timeout(120)
TOPOLOGY = Topology("fedq")


class _Federation:
    """An aggregator, a sender and a reader of the dead queue on one in-process broker."""

    def __init__(self, state_dir: Path) -> None:
        memory = MemoryBroker()
        self.registry = CollectorRegistry()
        transport = MemoryTransport(memory, TOPOLOGY)
        # Incomplete chunk sets are dead-lettered once this old.
        settings = AggregatorSettings(
            broker="memory",
            state_dir=str(use_known_key(state_dir)),
            max_message_bytes=MAX_MESSAGE_BYTES,
            chunk_max_age_s=0.05,
        )
        self.service = AggregatorService(transport, settings, AggregatorMetrics(self.registry))
        transport.declare()
        transport.subscribe(TOPOLOGY.jobs)
        transport.subscribe(TOPOLOGY.updates)
        self.sender = MemoryTransport(memory, TOPOLOGY)
        for worker in WORKERS:
            self.sender.declare_worker(worker)
        self.dead = MemoryTransport(memory, TOPOLOGY)
        self.dead.subscribe(TOPOLOGY.dead)
        self.state_dir = state_dir
        self.sender.publish(TOPOLOGY.jobs, JOB_ROUTING_KEY, encode_message(job()))
        self.service.run_until_idle()

    def feed(self, case: Case) -> None:
        for part in case.parts:
            self.sender.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, part)
        self.service.run_until_idle(idle_s=0.01)  # the in-process broker delivers at once
        # A chunk set left incomplete is dead-lettered by a receive that finds the queue idle
        # once the set is older than max_age_s, as the service's loop would a moment later.
        for _ in range(20):
            if not self.service.transport.chunk_backlog()[0]:
                break
            time.sleep(0.06)
            self.service.step(0.01)

    def take_dead(self) -> list[tuple[str, str, bytes]]:
        """(reason, source queue, body) of every dead letter so far, acknowledged."""
        taken = []
        while (delivery := self.dead.receive(0.01)) is not None:
            headers = delivery.headers
            taken.append((headers[REASON_HEADER], headers[SOURCE_HEADER], delivery.body))
            self.dead.ack(delivery)
        return taken

    def rejected(self, reason: str) -> float:
        value = self.registry.get_sample_value(
            "fedq_aggregator_updates_rejected_total", {"reason": reason}
        )
        return value or 0.0

    def job_file(self, name: str) -> Path:
        return self.state_dir / "jobs" / "hostile-1" / name


def _log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]


def test_each_bad_message_is_dead_lettered_with_its_reason_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    federation = _Federation(tmp_path)
    observed: dict[str, str] = {}

    for case in sequence():
        caplog.clear()
        before = federation.rejected(case.reason) if not case.valid else 0.0
        federation.feed(case)
        dead = federation.take_dead()
        if case.valid:
            assert dead == [], case.name
            continue
        lines = _log_lines(caplog)
        observed[case.name] = dead[0][0] if dead else "(nothing dead-lettered)"
        assert Counter((r, b) for r, _, b in dead) == dead_letters([case]), case.name
        assert {source for _, source, _ in dead} == {TOPOLOGY.updates}
        assert federation.rejected(case.reason) == before + 1, case.name
        assert len(lines) == 1, f"{case.name} logged {len(lines)} times: {lines}"

    assert observed == {c.name: c.reason for c in sequence() if not c.valid}
    assert federation.service.jobs_done == 1
    history = [json.loads(h) for h in federation.job_file("history.jsonl").read_text().splitlines()]
    assert [h["update_ids"] for h in history[1:]] == [[f"valid-{k}"] for k in range(6)]
    summary = json.loads(federation.job_file("summary.json").read_text())
    assert summary["updates_accepted"] == 6


def test_the_counters_and_the_dead_queue_hold_every_rejection_of_a_whole_run(
    tmp_path: Path,
) -> None:
    federation = _Federation(tmp_path)
    cases = sequence()

    for case in cases:
        federation.feed(case)

    dead = federation.take_dead()
    assert Counter((r, b) for r, _, b in dead) == dead_letters(cases)
    assert {r: federation.rejected(r) for r in rejected_reasons(cases)} == rejected_reasons(cases)
    # The aggregator keeps running: it still answers after its job, and a late straggler is
    # rejected as such.
    late = next(c for c in cases if c.name == "valid_5")
    federation.feed(late)
    assert [r for r, _, _ in federation.take_dead()] == ["job_finished"]


def test_the_model_is_bit_identical_to_one_made_from_the_valid_updates_alone(
    tmp_path: Path,
) -> None:
    hostile = _Federation(tmp_path / "hostile")
    clean = _Federation(tmp_path / "clean")

    for case in sequence():
        hostile.feed(case)
        if case.valid:
            clean.feed(case)

    with_bad = load_file(hostile.job_file("model.safetensors"))
    without = load_file(clean.job_file("model.safetensors"))
    assert list(with_bad) == list(without)
    assert all(with_bad[n].tobytes() == without[n].tobytes() for n in without)
    assert clean.take_dead() == []
    assert any(without[n].tobytes() != INITIAL[n].tobytes() for n in without), "it trained"
