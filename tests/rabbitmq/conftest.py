"""Fixtures for tests against a real RabbitMQ: a fresh topology per test, deleted afterwards."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pika
import pika.exceptions
import pytest
from rabbitmq_scratch import Scratch, Spawn, Vhost, ctl, with_query

from broker.topology import Topology

AMQP_URL = os.environ.get("FEDQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The broker URL, after checking that the broker answers (fail under CI=true, else skip)."""
    try:
        probe = pika.BlockingConnection(
            pika.URLParameters(with_query(AMQP_URL, connection_attempts=1, socket_timeout=3))
        )
    except pika.exceptions.AMQPError as e:
        why = f"RabbitMQ is unreachable at {urlsplit(AMQP_URL).hostname}: {e!r}"
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"{why}; CI=true needs the broker (rabbitmq-server -detached)", pytrace=False
            )
        pytest.skip(f"{why} (skipped outside CI; with CI=true this fails)")
    probe.close()
    return AMQP_URL


@pytest.fixture
def scratch(amqp_url: str) -> Iterator[Scratch]:
    """A unique topology prefix for one test, with its queues and exchanges deleted afterwards."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    scratch = Scratch(amqp_url, Topology(f"fedqtest-{uuid.uuid4().hex[:8]}"), connection.channel())
    try:
        yield scratch
    finally:
        scratch.cleanup()
        if connection.is_open:
            connection.close()


@pytest.fixture
def spawn(scratch: Scratch, tmp_path: Path) -> Iterator[Spawn]:
    """Start `python -m SERVICE` on the test's topology; kill what is left afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(service: str, name: str, *argv: str) -> subprocess.Popen[bytes]:
        common = ["--broker", scratch.url, "--prefix", scratch.topology.prefix]
        with open(tmp_path / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", service, *common, "--log-level", "INFO", *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


@pytest.fixture
def vhost(amqp_url: str) -> Iterator[Vhost]:
    """A throw-away vhost with guest as its admin; its users are deleted with it."""
    name = f"fedqperm-{uuid.uuid4().hex[:8]}"
    ctl("add_vhost", name)
    ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    made = Vhost(name, amqp_url)
    try:
        yield made
    finally:
        for close in reversed(made.closers):
            # A connection the test left broken: the vhost goes anyway.
            with contextlib.suppress(Exception):
                close()
        for user in made.users:
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True)
        ctl("delete_vhost", name)
