"""A hostile site on a real RabbitMQ, with the least-privilege account `fedq broker add-worker`
makes: what it sends must not stop the aggregator, and honest sites' training goes on.

The aggregator and the honest workers are separate processes, each with its own account, on a
throw-away vhost; the hostile site publishes by hand with its own account. The last test mounts
every attack of fedq issue 10 while two sites train, and accounts for every message as the chaos
test does (tests/rabbitmq/test_chaos.py): each honest update is folded in exactly once or
rejected with a recorded reason (lost 0, counted twice 0), each hostile one has its reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import msgpack
import numpy as np
import pika
import pytest
from hostile_input import _update
from hostile_properties import POISON, RawProperties, properties
from rabbitmq_scratch import PASSWORD, Vhost

from broker.rabbitmq import RabbitMQTransport, decode_properties_tolerantly
from broker.topology import (
    JOB_ROUTING_KEY,
    REASON_HEADER,
    SOURCE_HEADER,
    UPDATE_ROUTING_KEY,
    USER_ID_HEADER,
    read_dead_letter,
)
from shared.chunks import decode_chunk, is_chunk, split_payload
from shared.errors import ProtocolError, PublishError
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import Hello, Job, Task, Update, decode_message, encode_message

pytestmark = pytest.mark.rabbitmq
SPEC = JobSpec(
    name="hostile-site",
    model=ModelSpec("mlp", (1, 8, 8), 10),
    dataset="digits",
    strategy=StrategyConfig(name="fedasync", alpha=0.5),
    training=TrainingConfig(batch_size=16, max_batches=2),
    stop=StopConfig(max_versions=100_000, max_time_s=120.0),
)


class Start(Protocol):
    def __call__(
        self, service: str, log: str, url: str, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]: ...


@pytest.fixture
def start(vhost: Vhost, tmp_path: Path) -> Iterator[Start]:
    """Start `python -m SERVICE` on the vhost with the given account's URL; kill it afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def run(
        service: str, log: str, url: str, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        common = ["--broker", url, "--prefix", vhost.topology.prefix, "--log-level", "INFO"]
        with open(tmp_path / f"{log}.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", service, *common, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=os.environ | (env or {}),
            )
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return str(response.read().decode())
    except (OSError, urllib.error.URLError):
        return ""


def _wait_for_version(base: str, version: int, timeout: float = 120.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        body = _get(base + "/status")
        status = json.loads(body) if body else {}
        if isinstance(status.get("version"), int) and int(str(status["version"])) >= version:
            return status
        time.sleep(0.5)
    raise AssertionError(f"no version {version} at {base}/status after {timeout} s: {status}")


def _site(vhost: Vhost, name: str) -> RabbitMQTransport:
    """A site's own connection, as `fedq broker add-worker` allows it."""
    return vhost.site(name)


def _honest_worker(
    start: Start, vhost: Vhost, name: str, index: int = 0, partitions: int = 2, *argv: str
) -> subprocess.Popen[bytes]:
    return start(
        "worker", name, vhost.url(name, PASSWORD), "--worker-id", name, "--dataset", "digits",
        "--num-partitions", str(partitions), "--partition-index", str(index), "--threads", "1",
        *argv, env={"FEDQ_STAMP_USER_ID": "true", "FEDQ_DECLARE_TOPOLOGY": "false"},
    )  # fmt: skip


@pytest.mark.timeout(300)
def test_a_hello_for_a_worker_with_no_task_queue_is_a_fact_about_that_worker_not_a_crash(
    vhost: Vhost, start: Start, tmp_path: Path
) -> None:
    honest = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    hostile = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    port = _free_port()
    admin = vhost.transport()
    admin.declare()
    aggregator = start(
        "aggregator", "aggregator", vhost.url(), "--state-dir", str(tmp_path / "state"),
        "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
    )  # fmt: skip
    admin.publish(vhost.topology.jobs, JOB_ROUTING_KEY, encode_message(Job("ghost-1", SPEC)))
    site = _site(vhost, hostile)
    # Not checked against user_id without require_user_id: any id, here one with no task queue.
    site.publish(
        vhost.topology.updates, UPDATE_ROUTING_KEY, encode_message(Hello("ghost", 5, "cpu"))
    )
    worker = _honest_worker(start, vhost, honest)

    status = _wait_for_version(f"http://127.0.0.1:{port}", 3)
    metrics = _get(f"http://127.0.0.1:{port}/metrics")
    alive = aggregator.poll() is None
    aggregator.terminate()
    worker.terminate()
    aggregator.wait(30)
    worker.wait(30)

    assert alive, (tmp_path / "aggregator.log").read_text()[-3000:]
    assert {"worker_id": "ghost", "reason": "no_task_queue"}.items() <= next(
        w
        for w in status["failed_workers"]
        if w["worker_id"] == "ghost"  # type: ignore[attr-defined]
    ).items()
    assert 'fedq_aggregator_worker_failures_total{reason="no_task_queue"} 1.0' in metrics


# ---------------------------------------------------------------- every attack, while sites train

HONEST = 2
FLOOD = 40  # first envelopes of chunk sets never completed
SETS_PER_SENDER = 4  # AggregatorSettings.max_chunk_sets_per_sender: the sets of one sender held
NORM_RATIO = 10.0
ASCENT = (300.0, 30.0, 3.0)  # gradient ascent: minus this many times an honest site's delta
FLOAT32_MAX = float(np.finfo(np.float32).max)
ASCENT_REASON = "norm_too_large or accepted"  # either is recorded; which one, the test prints
HELLO = {"protocol": 1, "type": "hello", "num_samples": 1, "device": "cpu", "sent_at": 1.0}
TRAINING_SPEC = JobSpec(
    name="hostile-training",
    model=ModelSpec("mlp", (1, 8, 8), 10),
    dataset="digits",
    # server_lr 2: a delta near float32's limit takes the model out of range (with server_lr 1,
    # x + d stays within it for any finite d and a model of ordinary values).
    strategy=StrategyConfig(
        name="fedbuff", buffer_size=2, server_lr=2.0, max_update_norm_ratio=NORM_RATIO
    ),
    training=TrainingConfig(batch_size=32, max_batches=4),
    stop=StopConfig(max_versions=1_000_000, max_time_s=75.0),
    eval_every=1000,
)


class Tap:
    """A copy of every message routed to the updates queue, read by a connection that takes
    properties pika cannot decode (a 2^63 timestamp) instead of dropping."""

    def __init__(self, vhost: Vhost) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(vhost.url()))
        vhost.closers.append(connection.close)
        assert decode_properties_tolerantly(connection)
        self.channel = connection.channel()
        self.queue = f"{vhost.topology.prefix}.tap"
        self.channel.queue_declare(self.queue, durable=False)
        self.channel.queue_bind(self.queue, vhost.topology.updates, routing_key=UPDATE_ROUTING_KEY)
        self.seen: list[tuple[str | None, bytes]] = []  # (user_id, body)

    def drain(self) -> None:
        while True:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return
            self.seen.append((properties.user_id, body))

    def updates(self, users: set[str]) -> list[Update]:
        """The updates these broker users published (chunk envelopes and other types left out)."""
        found = []
        for user, body in self.seen:
            if user in users:
                try:
                    message = decode_message(body)
                except ProtocolError:
                    continue
                if isinstance(message, Update):
                    found.append(message)
        return found


def _until(
    what: str, condition: Callable[[], Any], tick: Callable[[], None], timeout: float
) -> Any:
    """Poll `condition` (calling `tick` between tries) until it is true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        tick()
        time.sleep(0.3)
    return result


def _version(base: str) -> int:
    body = _get(base + "/status")
    version = json.loads(body).get("version") if body else None
    return version if isinstance(version, int) else -1


@dataclass
class Hostile:
    """A site's least-privilege account, turned against the federation: what it sent."""

    vhost: Vhost
    name: str
    refused: list[str] = field(default_factory=list)  # what the broker refused at publish
    expected: Counter[str] = field(default_factory=Counter)  # dead letters by reason
    in_protocol: dict[str, str] = field(default_factory=dict)  # update id -> expected reason
    ascent: dict[str, float] = field(default_factory=dict)  # update id -> scale

    def __post_init__(self) -> None:
        self.site = self.vhost.site(self.name)
        self.channel = self.vhost.channel(self.name)
        self.t = self.vhost.topology

    def send(self, body: bytes, reason: str) -> None:
        self.site.publish(self.t.updates, UPDATE_ROUTING_KEY, body)
        self.expected[reason] += 1

    def raw(self, body: bytes, encoded_properties: bytes, reason: str) -> None:
        self.channel.basic_publish(
            self.t.updates, UPDATE_ROUTING_KEY, body, RawProperties(encoded_properties)
        )
        self.expected[reason] += 1

    def refused_on(self, exchange: str, key: str, body: bytes, headers: dict[str, Any]) -> None:
        refuser = self.vhost.site(self.name)  # a refusal closes the channel it came on
        with pytest.raises(PublishError, match="ACCESS_REFUSED"):
            refuser.publish(exchange, key, body, headers)
        self.refused.append(exchange)

    def outside_the_protocol(self) -> None:
        """Items 1-6: messages that never reach a job, and what the broker refuses."""
        ghost = f"ghost-{uuid.uuid4().hex[:6]}"  # an id with no task queue and no account
        self.send(encode_message(Hello(ghost, 5, "cpu")), "user_mismatch")
        poison = encode_message(_update("poisoned-properties", 0, worker_id=self.name))
        timestamp = properties(POISON["timestamp_2_pow_63"], user_id=self.name)
        self.raw(poison, timestamp, "bad_properties")
        for _ in range(FLOOD):
            self.site.publish(
                self.t.updates, UPDATE_ROUTING_KEY, split_payload(bytes(1 << 20), 16 * 1024)[0]
            )
        self.expected["chunk_limit"] += FLOOD - SETS_PER_SENDER
        self.expected["incomplete_chunks"] += SETS_PER_SENDER
        huge = HELLO | {"worker_id": self.name, "junk": [{}] * (12 * 1024 * 1024)}
        self.raw(msgpack.packb(huge), properties(user_id=self.name), "too_large")
        mkdir = encode_message(Job("mkdir-1", replace(TRAINING_SPEC, dataset="os:mkdir")))
        self.send(mkdir, "unexpected_type")
        self.refused_on(self.t.jobs, JOB_ROUTING_KEY, mkdir, {})
        forged = {REASON_HEADER: "bad_tensor", SOURCE_HEADER: self.t.updates}
        self.refused_on(self.t.dead, "", b"a forged dead letter", forged)

    def join(self) -> None:
        """Item 1, its own id: say hello from its own task queue, as a worker does."""
        self.site.declare_worker(self.name)
        self.site.subscribe(self.t.task_queue(self.name))
        self.site.publish(
            self.t.updates, UPDATE_ROUTING_KEY, encode_message(Hello(self.name, 900, "cpu"))
        )

    def task(self, timeout: float = 90.0) -> Task:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            delivery = self.site.receive(1.0)
            if delivery is not None:
                self.site.ack(delivery)
                task = decode_message(delivery.body)
                assert isinstance(task, Task)
                return task
        raise AssertionError(f"no task for {self.name} within {timeout} s")

    def answer(self, task: Task, tensors: dict[str, np.ndarray], reason: str, **fields: Any) -> str:
        values: dict[str, Any] = {
            "job_id": task.job_id,
            "update_id": uuid.uuid4().hex,
            "worker_id": self.name,
            "task_id": task.task_id,
            "base_version": task.version,
            "round": task.round,
            "kind": task.training.send,
            "num_samples": 900,
            "tensors": tensors,
            "metrics": {"loss": 1.0},
        } | fields
        update = Update(**values)
        self.site.publish(self.t.updates, UPDATE_ROUTING_KEY, encode_message(update))
        self.in_protocol[update.update_id] = reason
        if reason not in ("accepted", ASCENT_REASON):
            self.expected[reason] += 1
        return update.update_id

    def inside_the_protocol(self, honest_delta: Callable[[], dict[str, np.ndarray]]) -> None:
        """Items 7-9: answers to real tasks, each wrong in its own way."""
        first = self.task()
        copied = honest_delta()  # a free rider's update: another site's latest delta
        accepted = self.answer(first, copied, "accepted")
        self.answer(first, copied, "task_used", update_id=uuid.uuid4().hex)
        self.answer(first, copied, "unknown_task", task_id="task-made-up")
        second = self.task()  # the first was used: a task with a newer model
        near_limit = {n: np.full_like(a, FLOAT32_MAX * 0.999) for n, a in copied.items()}
        self.answer(second, near_limit, "out_of_range")
        copied = honest_delta()
        for scale in ASCENT:
            ascent = {n: (-scale * a).astype(a.dtype) for n, a in copied.items()}
            self.ascent[self.answer(second, ascent, ASCENT_REASON)] = scale
        assert accepted in self.in_protocol


@pytest.mark.timeout(420)
def test_a_hostile_site_attacking_while_sites_train_loses_no_honest_update_and_counts_none_twice(
    vhost: Vhost, start: Start, tmp_path: Path
) -> None:
    t = vhost.topology
    honest = [vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}") for _ in range(HONEST)]
    mallory = vhost.add_worker(f"site-{uuid.uuid4().hex[:6]}")
    admin = vhost.transport(stamp_user_id=True)  # require_user_id: a job says who submitted it
    admin.declare()
    tap = Tap(vhost)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "run"
    aggregator = start(
        "aggregator", "aggregator", vhost.url(), "--state-dir", str(tmp_path / "state"),
        "--output-dir", str(out), "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
        "--worker-timeout", "30",
        env={"FEDQ_REQUIRE_USER_ID": "true", "FEDQ_CHUNK_IDLE_S": "10"},
    )  # fmt: skip
    admin.publish(t.jobs, JOB_ROUTING_KEY, encode_message(Job("hostile-training-1", TRAINING_SPEC)))
    # Slowed down a little, to share a small machine: still hundreds of updates in the job.
    workers = [
        _honest_worker(start, vhost, name, i, HONEST, "--slowdown", "4")
        for i, name in enumerate(honest)
    ]

    def latest_honest_delta() -> dict[str, np.ndarray]:
        tap.drain()
        return dict(tap.updates(set(honest))[-1].tensors)

    def every_honest_site_sent() -> bool:
        tap.drain()
        return {u.worker_id for u in tap.updates(set(honest))} == set(honest)

    _until("an update from every honest site", every_honest_site_sent, tap.drain, 120.0)
    hostile = Hostile(vhost, mallory)
    hostile.outside_the_protocol()
    hostile.join()
    hostile.inside_the_protocol(latest_honest_delta)
    attacked_at = _until("a version after the attacks", lambda: _version(base) + 1, tap.drain, 60)
    _until("the job's end", (out / "summary.json").exists, tap.drain, 180.0)
    for worker in workers:  # a SIGTERM'd worker first sends what it was training
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.wait(60)
    # Everything published is settled: stragglers rejected as job_finished, chunk sets expired.
    admin_channel = vhost.channel()
    _until(
        "the updates queue drained",
        lambda: admin_channel.queue_declare(t.updates, passive=True).method.message_count == 0,
        tap.drain,
        60.0,
    )
    expired = 'fedq_aggregator_updates_rejected_total{reason="incomplete_chunks"}'
    _until("the flood's held chunk sets expired", lambda: expired in _get(base + "/metrics"),
           tap.drain, 60.0)  # fmt: skip
    alive = aggregator.poll() is None
    aggregator.send_signal(signal.SIGTERM)
    assert aggregator.wait(60) == 0 and alive, (tmp_path / "aggregator.log").read_text()[-3000:]
    tap.drain()

    published = {u.update_id for u in tap.updates(set(honest))}
    folded = [
        uid
        for line in (out / "history.jsonl").read_text().splitlines()
        for uid in json.loads(line)["update_ids"]
    ]
    rejected: dict[str, str] = {}
    rejections = out / "rejections.jsonl"
    for line in rejections.read_text().splitlines() if rejections.exists() else []:
        record = json.loads(line)
        rejected[record["update_id"]] = record["reason"]
    # Dead letters by sender and reason, a message in chunks counted once: a copy larger than
    # the chunk size (the 12 MB hello) is dead-lettered in envelopes, as chunk sets are.
    dead: dict[tuple[str, str], set[object]] = {}
    for index, (props, body) in enumerate(_dead_letters(vhost)):
        letter = read_dead_letter(props.headers)
        user = str(props.headers.get(USER_ID_HEADER, ""))
        key = decode_chunk(body).message_id if is_chunk(body) else index
        dead.setdefault((user, letter.reason), set()).add(key)
        with contextlib.suppress(ProtocolError):
            if isinstance(message := decode_message(body), Update):
                rejected.setdefault(message.update_id, letter.reason)
    dead_by_user: dict[str, Counter[str]] = {}
    for (user, reason), messages in dead.items():
        dead_by_user.setdefault(user, Counter())[reason] = len(messages)
    lost = published - set(folded) - set(rejected)
    twice = [uid for uid, n in Counter(folded).items() if n > 1]
    honest_rejected = Counter(rejected[uid] for uid in published if uid in rejected)
    summary = json.loads((out / "summary.json").read_text())
    outcomes = {
        uid: "accepted" if uid in folded else rejected.get(uid, "?") for uid in hostile.in_protocol
    }
    ascent = {scale: outcomes[uid] for uid, scale in hostile.ascent.items()}
    hostile_dead = dead_by_user.get(mallory, Counter())
    print(
        f"\nhostile site: published {len(published)} honest, folded {len(set(folded))} into "
        f"{summary['versions']} versions (attacks over by version {attacked_at - 1}), honest "
        f"rejected {dict(honest_rejected)}, lost {len(lost)}, counted twice {len(twice)}; "
        f"hostile dead letters {dict(hostile_dead)}, refused at publish {len(hostile.refused)}, "
        f"gradient ascent {ascent}"
    )

    assert lost == set()
    assert twice == []
    assert set(folded) & set(rejected) == set()  # none both folded and rejected
    assert set(honest_rejected) <= {"job_finished"}
    assert len(published) > 20
    assert summary["versions"] >= attacked_at + 10
    assert hostile.refused == [t.jobs, t.dead]
    # Every hostile message is where its reason says: dead-lettered, and its updates recorded.
    for uid, expected in hostile.in_protocol.items():
        if expected != ASCENT_REASON:
            assert outcomes[uid] == expected, (uid, expected, outcomes[uid])
    assert ascent[300.0] == ascent[30.0] == "norm_too_large"
    assert ascent[3.0] in ("accepted", "norm_too_large")
    bounded = Counter(reason for reason in ascent.values() if reason == "norm_too_large")
    assert hostile_dead == hostile.expected + bounded
    assert set(dead_by_user) <= {mallory, *honest}


def _dead_letters(vhost: Vhost) -> list[tuple[Any, bytes]]:
    """(properties, body) of every dead letter, read as the tap reads."""
    connection = pika.BlockingConnection(pika.URLParameters(vhost.url()))
    vhost.closers.append(connection.close)
    decode_properties_tolerantly(connection)
    channel = connection.channel()
    taken: list[tuple[Any, bytes]] = []
    while True:
        method, props, body = channel.basic_get(vhost.topology.dead, auto_ack=True)
        if method is None:
            return taken
        taken.append((props, body))
