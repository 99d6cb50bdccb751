"""Tests of shared.ops: health, sd_notify, the watchdog thread and the /metrics endpoint."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, Counter

from shared.errors import ConfigError
from shared.ops import Health, MetricsServer, Operations, SystemdNotifier, json_text


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class OpsSettings:
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    health_timeout_s: float = 60.0


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named by NOTIFY_SOCKET."""
    # pytest's tmp_path can exceed the 108 bytes a unix socket path may have.
    with tempfile.TemporaryDirectory(prefix="fedq-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            monkeypatch.delenv("WATCHDOG_USEC", raising=False)
            monkeypatch.delenv("WATCHDOG_PID", raising=False)
            yield sock


def received(sock: socket.socket, seconds: float) -> list[str]:
    """Every message the socket gets within `seconds`."""
    out: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return out


def wait_for(sock: socket.socket, wanted: str, seconds: float = 5.0) -> list[str]:
    """Messages up to and including the first one holding the line `wanted`."""
    out: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if wanted in out[-1].split("\n"):
            return out
    raise AssertionError(f"no {wanted!r} within {seconds} s; got {out}")


def get(url: str, accept: str | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, error statuses included."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers["Content-Type"], e.read()


@pytest.fixture
def served() -> Iterator[tuple[str, Health, FakeClock, Counter]]:
    """A MetricsServer on an ephemeral port with one counter and a hand-driven health."""
    registry = CollectorRegistry()
    counter = Counter("fedq_test_things", "Things counted.", registry=registry)
    clock = FakeClock()
    health = Health(clock)
    server = MetricsServer(registry, health, "127.0.0.1", 0, timeout_s=30.0)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", health, clock, counter
    finally:
        server.close()


# ---------------------------------------------------------------------- health


@pytest.mark.timeout(10)
def test_health_is_starting_until_ready_then_ok_while_the_loop_goes_round() -> None:
    clock = FakeClock()
    health = Health(clock)

    starting = health.report(timeout_s=5)
    health.mark_ready()
    clock.now += 4
    health.progress()
    clock.now += 4
    ok = health.report(timeout_s=5)

    assert starting == (False, {"status": "starting", "connected": False, "last_progress_s": None})
    assert ok == (True, {"status": "ok", "connected": True, "last_progress_s": 4.0})


@pytest.mark.timeout(10)
def test_health_is_stalled_when_the_loop_has_not_gone_round_within_the_timeout() -> None:
    clock = FakeClock()
    health = Health(clock)
    health.mark_ready()

    clock.now += 5.5
    healthy, body = health.report(timeout_s=5)

    assert not healthy
    assert body == {"status": "stalled", "connected": True, "last_progress_s": 5.5}


@pytest.mark.timeout(10)
def test_health_is_stopping_once_the_service_was_asked_to_stop() -> None:
    health = Health()
    health.mark_ready()

    health.mark_stopping()

    assert health.report(timeout_s=5)[0] is False
    assert health.report(timeout_s=5)[1]["status"] == "stopping"


# ---------------------------------------------------------------------- sd_notify


@pytest.mark.timeout(10)
def test_notify_sends_newline_separated_assignments_to_notify_socket(
    notify_socket: socket.socket,
) -> None:
    notifier = SystemdNotifier.from_environ(os.environ)

    sent = notifier.notify("READY=1", "STATUS=serving")

    assert sent is True
    assert received(notify_socket, 0.3) == ["READY=1\nSTATUS=serving"]


@pytest.mark.timeout(10)
def test_notify_reaches_a_socket_in_the_abstract_namespace() -> None:
    name = f"fedq-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})

        notifier.notify("WATCHDOG=1")

        assert received(sock, 0.3) == ["WATCHDOG=1"]


@pytest.mark.timeout(10)
def test_without_notify_socket_nothing_is_sent_and_no_thread_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    health = Health()

    notifier = SystemdNotifier.from_environ(os.environ)
    with Operations(CollectorRegistry(), health, OpsSettings()) as ops:
        health.mark_ready()
        health.mark_stopping()

    assert notifier.enabled is False
    assert notifier.notify("READY=1") is False
    assert ops.server is None and ops._supervisor is None


@pytest.mark.timeout(10)
def test_watchdog_interval_comes_from_watchdog_usec_only_for_this_process() -> None:
    mine = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    other = mine | {"WATCHDOG_PID": str(os.getpid() + 1)}

    assert SystemdNotifier.from_environ(mine).watchdog_s == 3.0
    assert SystemdNotifier.from_environ(other).watchdog_s is None
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/run/x"}).watchdog_s is None


@pytest.mark.timeout(10)
def test_operations_send_ready_with_status_once_ready_and_stopping_at_the_end(
    notify_socket: socket.socket,
) -> None:
    health = Health()

    with Operations(CollectorRegistry(), health, OpsSettings()):
        before = received(notify_socket, 0.3)
        health.mark_ready()
        ready = wait_for(notify_socket, "READY=1")
        health.progress("job j: version 3")
        status = wait_for(notify_socket, "STATUS=job j: version 3")
    stopping = received(notify_socket, 0.3)

    assert before == []
    assert ready == ["READY=1\nSTATUS=starting"]
    assert status == ["STATUS=job j: version 3"]
    assert stopping == ["STOPPING=1\nSTATUS=stopping"]


@pytest.mark.timeout(10)
def test_stopping_is_sent_soon_after_a_signal_handler_marks_the_service_stopping(
    notify_socket: socket.socket,
) -> None:
    health = Health()

    with Operations(CollectorRegistry(), health, OpsSettings()):
        health.mark_ready()
        wait_for(notify_socket, "READY=1")
        health.mark_stopping()
        stopping = wait_for(notify_socket, "STOPPING=1", seconds=2.0)
    after = received(notify_socket, 0.3)

    assert stopping == ["STOPPING=1\nSTATUS=stopping"]
    assert after == []


@pytest.mark.timeout(20)
def test_watchdog_pings_only_while_the_service_loop_makes_progress(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: a ping every 0.1 s
    clock = FakeClock()
    health = Health(clock)

    with Operations(CollectorRegistry(), health, OpsSettings()):
        health.mark_ready()
        wait_for(notify_socket, "READY=1")
        fresh = received(notify_socket, 0.6)
        clock.now += 5  # the loop is stuck for longer than the watchdog interval
        wait_for(notify_socket, "STATUS=stuck for 5 s; watchdog pings withheld")
        stuck = received(notify_socket, 0.6)
        health.progress()
        resumed = wait_for(notify_socket, "STATUS=starting", seconds=2.0)

    assert fresh.count("WATCHDOG=1") >= 3
    assert "WATCHDOG=1" not in stuck
    assert resumed == ["WATCHDOG=1\nSTATUS=starting"]


# ---------------------------------------------------------------------- HTTP


@pytest.mark.timeout(10)
def test_metrics_serves_the_registry_in_the_prometheus_text_format(
    served: tuple[str, Health, FakeClock, Counter],
) -> None:
    url, _, _, counter = served
    counter.inc(3)

    status, content_type, body = get(url + "/metrics")

    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "fedq_test_things_total 3.0" in body.decode().splitlines()


@pytest.mark.timeout(10)
def test_metrics_speaks_openmetrics_to_a_scraper_that_asks_for_it(
    served: tuple[str, Health, FakeClock, Counter],
) -> None:
    url = served[0]

    status, content_type, body = get(url + "/metrics", accept="application/openmetrics-text")

    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().endswith("# EOF\n")


@pytest.mark.timeout(10)
def test_healthz_is_503_before_ready_200_with_progress_and_503_when_stalled(
    served: tuple[str, Health, FakeClock, Counter],
) -> None:
    url, health, clock, _ = served

    starting = get(url + "/healthz")
    health.mark_ready()
    clock.now += 2
    ok = get(url + "/healthz")
    clock.now += 30
    stalled = get(url + "/healthz")

    assert starting[0] == 503 and json.loads(starting[2])["status"] == "starting"
    assert ok[:2] == (200, "application/json")
    assert json.loads(ok[2]) == {"status": "ok", "connected": True, "last_progress_s": 2.0}
    assert stalled[0] == 503 and json.loads(stalled[2])["status"] == "stalled"


@pytest.mark.timeout(10)
def test_other_paths_are_404(served: tuple[str, Health, FakeClock, Counter]) -> None:
    url = served[0]

    assert get(url + "/")[0] == 404
    assert get(url + "/metrics/x")[0] == 404


@pytest.mark.timeout(10)
def test_a_port_in_use_is_a_config_error_naming_it(
    served: tuple[str, Health, FakeClock, Counter],
) -> None:
    port = int(served[0].rsplit(":", 1)[1])

    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
        MetricsServer(CollectorRegistry(), Health(), "127.0.0.1", port, timeout_s=1.0)


@pytest.mark.timeout(10)
def test_operations_close_the_port_when_the_block_ends() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = OpsSettings(metrics_port=port)

    with Operations(CollectorRegistry(), Health(), settings):
        during = get(f"http://127.0.0.1:{port}/metrics")[0]
    with pytest.raises(urllib.error.URLError):
        get(f"http://127.0.0.1:{port}/metrics")

    assert during == 200


def _strict_json(text: str | bytes) -> object:
    """json.loads that refuses NaN and Infinity, which are not JSON."""

    def refuse(constant: str) -> object:
        raise ValueError(f"bare {constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.timeout(10)
def test_status_answers_null_for_nan_and_infinite_figures_at_any_depth() -> None:
    figures = {"loss": float("nan"), "best": float("inf"), "runs": [{"loss": float("-inf")}]}
    server = MetricsServer(
        CollectorRegistry(), Health(), "127.0.0.1", 0, timeout_s=30.0, status=lambda: figures
    )
    server.start()
    try:
        code, _, body = get(f"http://127.0.0.1:{server.port}/status")
    finally:
        server.close()

    assert code == 200
    assert _strict_json(body) == {"loss": None, "best": None, "runs": [{"loss": None}]}


def test_json_text_writes_non_finite_floats_as_null_and_keeps_the_rest() -> None:
    text = json_text({"a": 0.5, "b": [1, float("nan")], "c": (2.0, "x"), "d": None})

    assert _strict_json(text) == {"a": 0.5, "b": [1, None], "c": [2.0, "x"], "d": None}
