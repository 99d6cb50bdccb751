"""Services as processes under a stand-in for systemd: READY=1, WATCHDOG=1, /healthz, STOPPING=1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from rabbitmq_scratch import Scratch

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notification socket, and its path."""
    with tempfile.TemporaryDirectory(prefix="fedq-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            yield sock, path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _messages_until(sock: socket.socket, wanted: str, seconds: float) -> list[str]:
    """Notification lines received up to and including `wanted`."""
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            lines += sock.recv(4096).decode().split("\n")
        except TimeoutError:
            break
        if wanted in lines:
            return lines
    raise AssertionError(f"no {wanted!r} within {seconds} s; got {lines}")


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("service", ["aggregator", "worker"])
def test_a_service_under_systemd_is_ready_pings_serves_health_and_says_stopping(
    service: str,
    scratch: Scratch,
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    port = _free_port()
    argv = ["--broker", scratch.url, "--prefix", scratch.topology.prefix]
    argv += ["--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--log-level", "INFO"]
    if service == "worker":
        scratch.transport().declare()  # the aggregator's job, in a deployment
        argv += ["--worker-id", scratch.worker("w0"), "--dataset", "digits", "--threads", "1"]
    else:
        argv += ["--state-dir", str(tmp_path / "state")]
    env = os.environ | {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    with open(tmp_path / "service.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", service, *argv], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        ready = _messages_until(sock, "READY=1", 60)
        pings = _messages_until(sock, "WATCHDOG=1", 5)
        health = _get(f"http://127.0.0.1:{port}/healthz")
        metrics = _get(f"http://127.0.0.1:{port}/metrics")

        proc.send_signal(signal.SIGTERM)
        stopping = _messages_until(sock, "STOPPING=1", 30)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)

    log_text = (tmp_path / "service.log").read_text()
    assert code == 0, log_text
    assert "READY=1" in ready and "WATCHDOG=1" in pings and "STOPPING=1" in stopping
    assert health[0] == 200 and json.loads(health[1])["connected"] is True
    assert metrics[0] == 200 and f"fedq_{service}_" in metrics[1]
