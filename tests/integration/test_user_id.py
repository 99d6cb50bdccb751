"""The broker-validated user_id: the in-process broker stamps a transport's user on what it
publishes, and an aggregator with require_user_id takes an update only from the user named like
its worker id, rejecting the others as user_mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile_input import JOB_ID, VALID_UPDATES, WORKER, WORKERS, job, valid
from known_task_key import use_known_key
from memory_job import dead_letters
from prometheus_client import CollectorRegistry

from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker import MemoryBroker, MemoryTransport, Topology, connect
from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY
from shared.messages import Hello, encode_message

pytestmark = pytest.mark.timeout(60)
TOPOLOGY = Topology("fedq")


def test_a_memory_transport_stamps_its_user_and_keeps_it_through_dead_lettering() -> None:
    memory = MemoryBroker()
    reader = MemoryTransport(memory, TOPOLOGY)
    reader.declare()
    reader.subscribe(TOPOLOGY.updates)
    MemoryTransport(memory, TOPOLOGY, user="site-a").publish(TOPOLOGY.updates, "update", b"x")
    MemoryTransport(memory, TOPOLOGY).publish(TOPOLOGY.updates, "update", b"y")
    first, second = reader.receive(1.0), reader.receive(1.0)
    assert first is not None and first.user_id == "site-a"
    assert second is not None and second.user_id is None
    reader.nack(first, requeue=False)  # to the dead queue, as the broker would, user kept
    reader.subscribe(TOPOLOGY.dead)
    dead = reader.receive(1.0)
    assert dead is not None and dead.queue == TOPOLOGY.dead and dead.user_id == "site-a"


def test_connect_stamps_the_user_only_when_asked() -> None:
    memory = MemoryBroker()
    assert connect("memory", TOPOLOGY, memory, user="w").user_id is None
    stamped = connect("memory", TOPOLOGY, memory, stamp_user_id=True, user="w")
    assert stamped.user_id == "w"


def _aggregator(memory: MemoryBroker, tmp_path: Path, require: bool) -> AggregatorService:
    # The job comes from an operator's account: with require_user_id it must carry a user_id.
    transport = MemoryTransport(memory, TOPOLOGY, user="operator")
    state_dir = str(use_known_key(tmp_path))
    settings = AggregatorSettings(broker="memory", state_dir=state_dir, require_user_id=require)
    service = AggregatorService(transport, settings, AggregatorMetrics(CollectorRegistry()))
    transport.declare()
    transport.subscribe(TOPOLOGY.jobs)
    transport.subscribe(TOPOLOGY.updates)
    transport.declare_worker(WORKER)
    transport.publish(TOPOLOGY.jobs, JOB_ROUTING_KEY, encode_message(job()))
    service.run_until_idle()
    return service


@pytest.mark.parametrize(
    ("user", "accepted"), [(WORKER, True), ("someone-else", False), (None, False)]
)
def test_require_user_id_takes_an_update_only_from_its_workers_user(
    tmp_path: Path, user: str | None, accepted: bool
) -> None:
    memory = MemoryBroker()
    service = _aggregator(memory, tmp_path, require=True)
    sender = MemoryTransport(memory, TOPOLOGY, user=user)
    sender.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, valid(0).parts[0])
    service.run_until_idle(idle_s=0.01)
    running = service._job
    assert running is not None
    assert running.state.version == (1 if accepted else 0)
    assert [reason for reason, _ in dead_letters(memory)] == ([] if accepted else ["user_mismatch"])


def test_an_update_in_another_sites_name_is_in_the_jobs_rejections_and_summary(
    tmp_path: Path,
) -> None:
    memory = MemoryBroker()
    service = _aggregator(memory, tmp_path, require=True)
    # Mallory sends w0's first update (same update_id) before w0 does: it is refused, and w0's own
    # is still taken (the refused one does not count as seen).
    impostor = MemoryTransport(memory, TOPOLOGY, user="mallory")
    impostor.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, valid(0).parts[0])
    for k in range(VALID_UPDATES):
        site = MemoryTransport(memory, TOPOLOGY, user=WORKERS[k % len(WORKERS)])
        site.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, valid(k).parts[0])
    service.run_until_idle(idle_s=0.01)

    run_dir = tmp_path / "jobs" / JOB_ID
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["versions"] == VALID_UPDATES
    assert summary["updates_rejected"] == 1
    assert summary["rejected_by_reason"] == {"user_mismatch": 1}
    rejections = [
        json.loads(line) for line in (run_dir / "rejections.jsonl").read_text().splitlines()
    ]
    assert rejections == [
        {
            "update_id": "valid-0",
            "worker_id": WORKER,
            "reason": "user_mismatch",
            "detail": f"worker {WORKER!r} published as user 'mallory'",
        }
    ]
    assert [reason for reason, _ in dead_letters(memory)] == ["user_mismatch"]


def test_require_user_id_refuses_a_hello_in_another_workers_name_and_sends_it_no_task(
    tmp_path: Path,
) -> None:
    memory = MemoryBroker()
    service = _aggregator(memory, tmp_path, require=True)
    impostor = MemoryTransport(memory, TOPOLOGY, user="someone-else")
    impostor.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, encode_message(Hello(WORKER, 5, "cpu")))
    service.run_until_idle(idle_s=0.01)

    assert [reason for reason, _ in dead_letters(memory)] == ["user_mismatch"]
    assert memory.depth(TOPOLOGY.task_queue(WORKER)) == 0
    assert service._job is not None and WORKER not in service._job.state.workers


def test_without_require_user_id_the_user_is_not_checked(tmp_path: Path) -> None:
    memory = MemoryBroker()
    service = _aggregator(memory, tmp_path, require=False)
    sender = MemoryTransport(memory, TOPOLOGY, user="someone-else")
    sender.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, valid(0).parts[0])
    service.run_until_idle(idle_s=0.01)
    assert service._job is not None and service._job.state.version == 1
    assert [reason for reason, _ in dead_letters(memory)] == []
