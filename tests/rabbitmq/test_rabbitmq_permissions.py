"""Least privilege on a real RabbitMQ: `fedq broker add-worker` makes a user that can publish
updates and read its own tasks and nothing else, and whose updates carry the broker-validated
user_id the aggregator checks. Each test has a throw-away vhost and users, deleted afterwards."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pika
import pytest
import torch
from hostile_input import JOB_ID, _update, job
from prometheus_client import CollectorRegistry
from rabbitmq_scratch import PASSWORD, Vhost, aggregator_with_job, ctl

from aggregator.cli import main as fedq_main
from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker.rabbitmq import RabbitMQTransport
from broker.topology import (
    DETAIL_HEADER,
    JOB_ROUTING_KEY,
    REASON_HEADER,
    SOURCE_HEADER,
    UPDATE_ROUTING_KEY,
    USER_ID_HEADER,
    DeadLetter,
    read_dead_letter,
)
from shared.errors import PublishError, TransportError
from shared.messages import Cancel, Job, encode_message
from worker.data import LocalData
from worker.metrics import WorkerMetrics
from worker.service import WorkerService
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(120)


def _worker_transport(vhost: Vhost, name: str) -> RabbitMQTransport:
    return vhost.site(name)


def _admin_channel(vhost: Vhost) -> tuple[pika.BlockingConnection, object]:
    connection = pika.BlockingConnection(pika.URLParameters(vhost.url()))
    return connection, connection.channel()


def test_a_worker_publishes_updates_with_its_user_id_and_reads_its_own_tasks(
    vhost: Vhost,
) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    worker = _worker_transport(vhost, name)
    worker.declare_worker(name)  # passive: the queue add-worker made is there
    worker.subscribe(vhost.topology.task_queue(name))
    worker.publish(vhost.topology.updates, UPDATE_ROUTING_KEY, b"an update")
    admin = vhost.transport()
    admin.publish(vhost.topology.tasks, name, b"a task")
    delivery = worker.receive(5.0)
    assert delivery is not None and delivery.body == b"a task"
    worker.ack(delivery)
    admin.subscribe(vhost.topology.updates)
    update = admin.receive(5.0)
    assert update is not None and update.body == b"an update" and update.user_id == name
    admin.ack(update)


def test_a_worker_cannot_publish_tasks_or_jobs_read_other_queues_or_declare(
    vhost: Vhost,
) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    other = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    t = vhost.topology
    worker = _worker_transport(vhost, name)
    with pytest.raises(PublishError, match="ACCESS_REFUSED"):
        worker.publish(t.tasks, other, b"a forged model")
    with pytest.raises(PublishError, match="ACCESS_REFUSED"):
        worker.publish(t.tasks, name, b"a model to itself")
    with pytest.raises(PublishError, match="ACCESS_REFUSED"):
        worker.publish(t.jobs, JOB_ROUTING_KEY, b"a job")
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        worker.subscribe(t.task_queue(other))
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        worker.subscribe(t.updates)
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        worker.declare()
    eager = vhost.transport(name)  # a worker that declares its queue actively is refused too
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        eager.declare_worker(name)
    # After all that the worker still works: each refusal closed only a channel.
    worker.publish(t.updates, UPDATE_ROUTING_KEY, b"still fine")


def test_a_worker_account_can_tell_whether_the_updates_exchange_is_there_without_more_rights(
    vhost: Vhost,
) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    worker = _worker_transport(vhost, name)

    there = worker.exchange_exists(vhost.topology.updates)
    missing = worker.exchange_exists(f"{vhost.topology.prefix}.nothing-here")

    assert there and not missing
    worker.publish(vhost.topology.updates, UPDATE_ROUTING_KEY, b"the connection is fine")


def test_the_broker_refuses_a_user_id_that_is_not_the_connections_user(vhost: Vhost) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    worker = _worker_transport(vhost, name)
    worker.user_id = "someone-else"
    with pytest.raises(PublishError, match="PRECONDITION_FAILED"):
        worker.publish(vhost.topology.updates, UPDATE_ROUTING_KEY, b"forged")


def test_the_aggregator_rejects_an_update_claiming_another_workers_id(
    vhost: Vhost, tmp_path: Path
) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    victim = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    t = vhost.topology
    service = aggregator_with_job(vhost, tmp_path)
    worker = _worker_transport(vhost, name)
    forged = _update("forged-1", 0, seed=1, worker_id=victim)
    honest = _update("honest-1", 0, seed=2, worker_id=name)
    worker.publish(t.updates, UPDATE_ROUTING_KEY, encode_message(forged))
    worker.publish(t.updates, UPDATE_ROUTING_KEY, encode_message(honest))
    service.run_until_idle(idle_s=0.5)
    running = service._job
    assert running is not None and running.state.version == 1
    connection, channel = _admin_channel(vhost)
    try:
        method, properties, _ = channel.basic_get(t.dead, auto_ack=True)  # type: ignore[attr-defined]
    finally:
        connection.close()
    assert method is not None and properties.headers[REASON_HEADER] == "user_mismatch"


def test_fedq_broker_add_worker_makes_the_user_and_queue(
    vhost: Vhost, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"site-{uuid.uuid4().hex[:6]}"
    vhost.users.append(name)
    assert (
        fedq_main(["broker", "add-worker", name, "--vhost", vhost.name, "--admin-url", vhost.url()])
        == 0
    )
    password = capsys.readouterr().out.strip()
    assert len(password) >= 24
    worker = RabbitMQTransport(
        vhost.url(name, password), vhost.topology, stamp_user_id=True, declare_topology=False
    )
    vhost.closers.append(worker.close)
    worker.declare_worker(name)
    worker.subscribe(vhost.topology.task_queue(name))


def test_fedq_broker_add_worker_run_again_keeps_the_users_password(
    vhost: Vhost, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"site-{uuid.uuid4().hex[:6]}"
    vhost.users.append(name)
    argv = ["broker", "add-worker", name, "--vhost", vhost.name, "--admin-url", vhost.url()]
    assert fedq_main(argv) == 0
    password = capsys.readouterr().out.strip()
    assert fedq_main(argv) == 0  # e.g. to repair the queue
    out, err = capsys.readouterr()
    assert out == ""
    assert f"user {name} exists; its password is unchanged" in err
    worker = RabbitMQTransport(
        vhost.url(name, password), vhost.topology, stamp_user_id=True, declare_topology=False
    )
    vhost.closers.append(worker.close)
    worker.declare_worker(name)  # the first password still logs in


def test_a_worker_account_cannot_cancel_a_job_and_a_submitting_account_can(
    vhost: Vhost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    t = vhost.topology
    transport = vhost.transport()
    settings = AggregatorSettings(state_dir=str(tmp_path))
    service = AggregatorService(transport, settings, AggregatorMetrics(CollectorRegistry()))
    transport.declare()
    transport.subscribe(t.jobs)
    transport.subscribe(t.updates)
    transport.publish(t.jobs, JOB_ROUTING_KEY, encode_message(job()))
    service.run_until_idle()
    worker = _worker_transport(vhost, name)

    with pytest.raises(PublishError, match="ACCESS_REFUSED"):
        worker.publish(t.jobs, JOB_ROUTING_KEY, encode_message(Cancel(JOB_ID)))
    refused = fedq_main(["cancel", JOB_ID, "--broker", vhost.url(name, PASSWORD)])
    refused_err = capsys.readouterr().err
    # The exchange a worker may write: the aggregator takes no cancel from the updates queue.
    worker.publish(t.updates, UPDATE_ROUTING_KEY, encode_message(Cancel(JOB_ID)))
    service.run_until_idle(idle_s=0.5)
    still_running = service._job is not None
    accepted = fedq_main(["cancel", JOB_ID, "--broker", vhost.url()])
    service.run_until_idle(idle_s=0.5)

    assert refused == 1 and "ACCESS_REFUSED" in refused_err
    assert still_running
    connection, channel = _admin_channel(vhost)
    try:
        method, properties, _ = channel.basic_get(t.dead, auto_ack=True)  # type: ignore[attr-defined]
    finally:
        connection.close()
    assert method is not None and properties.headers[REASON_HEADER] == "unexpected_type"
    assert accepted == 0 and service._job is None
    summary = json.loads((tmp_path / "jobs" / JOB_ID / "summary.json").read_text())
    assert summary["stop_reason"] == "cancelled"


def _dead_letters(vhost: Vhost) -> list[tuple[dict[str, Any], bytes]]:
    """(headers, body) of every message on the dead queue, taken off it."""
    connection, channel = _admin_channel(vhost)
    taken = []
    try:
        while True:
            method, properties, body = channel.basic_get(vhost.topology.dead, auto_ack=True)  # type: ignore[attr-defined]
            if method is None:
                return taken
            headers = dict(properties.headers or {})
            headers.pop("x-delivery-count", None)  # the quorum dead queue's own, on delivery
            taken.append((headers, body))
    finally:
        connection.close()


def _aggregator(vhost: Vhost, tmp_path: Path, **settings: object) -> AggregatorService:
    """An aggregator on the vhost (as guest), subscribed to jobs and updates."""
    transport = vhost.transport()
    service = AggregatorService(
        transport,
        AggregatorSettings(state_dir=str(tmp_path), **settings),  # type: ignore[arg-type]
        AggregatorMetrics(CollectorRegistry()),
    )
    transport.declare()
    transport.subscribe(vhost.topology.jobs)
    transport.subscribe(vhost.topology.updates)
    return service


def _dead_reasons(vhost: Vhost) -> list[str]:
    """The reasons of every dead letter so far, taken off the dead queue."""
    return [headers[REASON_HEADER] for headers, _ in _dead_letters(vhost)]


def test_a_worker_account_cannot_publish_to_the_dead_exchange(vhost: Vhost) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    worker = _worker_transport(vhost, name)
    forged = {REASON_HEADER: "bad_tensor", SOURCE_HEADER: vhost.topology.updates}

    with pytest.raises(PublishError, match="ACCESS_REFUSED"):
        worker.publish(vhost.topology.dead, "", b"a forged dead letter", forged)

    assert _dead_letters(vhost) == []
    worker.publish(vhost.topology.updates, UPDATE_ROUTING_KEY, b"still fine")


def _worker_service(vhost: Vhost, name: str) -> WorkerService:
    """A least-privilege worker service on the vhost, with a little random local data."""
    generator = torch.Generator().manual_seed(0)
    data = LocalData(torch.randn(16, 1, 8, 8, generator=generator), torch.arange(16) % 10)
    settings = WorkerSettings(
        worker_id=name, broker=vhost.url(name, PASSWORD), stamp_user_id=True,
        declare_topology=False, poll_interval_s=0.1,
    )  # fmt: skip
    return WorkerService(
        _worker_transport(vhost, name),
        settings,
        data,
        torch.device("cpu"),
        WorkerMetrics(CollectorRegistry()),
    )


def test_a_worker_refuses_an_unreadable_task_through_its_queues_dead_letter_exchange(
    vhost: Vhost,
) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    t = vhost.topology
    worker = _worker_service(vhost, name)
    worker.start()
    admin = vhost.transport()

    admin.publish(t.tasks, name, b"\xc1 not a task")
    refused = worker.metrics.tasks_failed.labels("malformed")
    while refused._value.get() == 0:
        worker.step(0.1)

    [(headers, body)] = _dead_letters(vhost)
    assert body == b"\xc1 not a task"
    [death] = headers["x-death"]
    assert (death["queue"], death["reason"], death["count"]) == (t.task_queue(name), "rejected", 1)
    assert not any(key.startswith("x-fedq-") for key in headers)
    assert read_dead_letter(headers) == DeadLetter("rejected", t.task_queue(name), "broker")


def test_forged_dead_letter_headers_on_an_update_do_not_survive_the_aggregators_dead_lettering(
    vhost: Vhost, tmp_path: Path
) -> None:
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    t = vhost.topology
    transport = vhost.transport(stamp_user_id=True)
    settings = AggregatorSettings(state_dir=str(tmp_path))
    service = AggregatorService(transport, settings, AggregatorMetrics(CollectorRegistry()))
    transport.declare()
    transport.subscribe(t.updates)
    worker = _worker_transport(vhost, name)
    forged = {
        REASON_HEADER: "bad_tensor",
        SOURCE_HEADER: t.task_queue("site-b"),
        DETAIL_HEADER: "site-b sent NaNs",
        USER_ID_HEADER: "site-b",
        "x-death": [{"queue": t.task_queue("site-b"), "reason": "rejected", "count": 1}],
        "x-first-death-reason": "rejected",
        "x-first-death-queue": t.task_queue("site-b"),
        "note": "kept",
    }
    update = _update("forged-headers", 0, worker_id=name, job_id="no-such-job")

    worker.publish(t.updates, UPDATE_ROUTING_KEY, encode_message(update), forged)
    service.run_until_idle(idle_s=0.5)

    [(headers, _)] = _dead_letters(vhost)
    assert headers == {
        REASON_HEADER: "unknown_job",
        SOURCE_HEADER: t.updates,
        DETAIL_HEADER: "job 'no-such-job' is not running",
        USER_ID_HEADER: name,
        "note": "kept",
    }
    assert read_dead_letter(headers) == DeadLetter("unknown_job", t.updates, "service")


def _add_submitter(vhost: Vhost, name: str) -> str:
    """A broker user allowed what `fedq submit` and `fedq cancel` need on the vhost."""
    vhost.users.append(name)
    ctl("add_user", name, PASSWORD)
    ctl("set_permissions", "-p", vhost.name, name, "^fedq\\.", "^fedq\\.", "^fedq\\.")
    return name


def test_a_worker_account_can_submit_no_job_whatever_the_job_names(
    vhost: Vhost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    real = os.mkdir

    def mkdir(path: object, *args: object) -> None:
        # The aggregator's own directories are Path objects; a job's call would be mkdir("test").
        if isinstance(path, os.PathLike):
            real(path, *args)  # type: ignore[arg-type]
        else:
            calls.append(path)

    monkeypatch.setattr(os, "mkdir", mkdir)
    name = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    service = _aggregator(vhost, tmp_path)
    worker = _worker_transport(vhost, name)
    hostile = Job("mkdir-1", replace(job().spec, dataset="os:mkdir"))

    with pytest.raises(PublishError, match="ACCESS_REFUSED"):
        worker.publish(vhost.topology.jobs, JOB_ROUTING_KEY, encode_message(hostile))
    worker.publish(vhost.topology.updates, UPDATE_ROUTING_KEY, encode_message(hostile))
    service.run_until_idle(idle_s=0.5)

    assert service._job is None and not service._queued_jobs
    assert _dead_reasons(vhost) == ["unexpected_type"]
    assert calls == []


def test_with_require_user_id_only_a_listed_submitters_jobs_run_and_the_summary_names_them(
    vhost: Vhost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    submitter = _add_submitter(vhost, f"ops-{uuid.uuid4().hex[:6]}")
    other = _add_submitter(vhost, f"intern-{uuid.uuid4().hex[:6]}")
    service = _aggregator(
        vhost, tmp_path / "state", require_user_id=True, job_submitters=(submitter,)
    )
    job_file = tmp_path / "job.toml"
    job_file.write_text('name = "t"\ndataset = "digits"\n[model]\nname = "mlp"\n')
    connection, channel = _admin_channel(vhost)
    try:  # guest publishing by hand, without a user_id
        channel.basic_publish(  # type: ignore[attr-defined]
            vhost.topology.jobs, JOB_ROUTING_KEY, encode_message(Job("anonymous-1", job().spec))
        )
    finally:
        connection.close()

    def submit(user: str, job_id: str) -> int:
        url = vhost.url(user, PASSWORD)
        return fedq_main(["submit", str(job_file), "--broker", url, "--job-id", job_id])

    submitted = [submit(other, "intern-1"), submit(submitter, "ops-1")]
    service.run_until_idle(idle_s=0.5)
    running = service._job is not None and service._job.job.job_id
    cancelled = fedq_main(["cancel", "ops-1", "--broker", vhost.url(submitter, PASSWORD)])
    service.run_until_idle(idle_s=0.5)
    capsys.readouterr()

    assert submitted == [0, 0] and running == "ops-1" and cancelled == 0
    assert _dead_reasons(vhost) == ["unattributed", "not_a_submitter"]
    summary = json.loads((tmp_path / "state" / "jobs" / "ops-1" / "summary.json").read_text())
    assert summary["stop_reason"] == "cancelled" and summary["submitted_by"] == submitter
    outcomes = (tmp_path / "state" / "job-outcomes.jsonl").read_text().splitlines()
    assert [json.loads(line)["submitted_by"] for line in outcomes] == [submitter]
