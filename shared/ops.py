"""Operating a service: its health, the /metrics and /healthz endpoint, systemd notifications.

Both services use this module the same way: the service loop reports to a `Health` (ready once
connected with its topology declared, a timestamp at every loop iteration, stopping), and
`Operations` turns that into HTTP answers and, under systemd, into READY=1, STATUS=, WATCHDOG=1
and STOPPING=1 messages (see docs/monitoring.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from shared.errors import ConfigError

logger = logging.getLogger(__name__)
# How often the systemd thread looks at the health besides its wake-ups (for STOPPING=1).
_POLL_S = 0.5


class Health:
    """A service's liveness as its own loop reports it; read from other threads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ready = False
        self._stopping = False
        self._last_progress: float | None = None
        self._status = "starting"
        # Set on every change worth telling systemd about at once; Operations waits on it.
        self.changed = threading.Event()

    def mark_ready(self) -> None:
        """The service is connected and its topology declared: it can do its work."""
        self._last_progress = self._clock()
        self._ready = True
        self.changed.set()

    def progress(self, status: str | None = None) -> None:
        """The service loop went round once (call it at the end of every step)."""
        self._last_progress = self._clock()
        if status is not None and status != self._status:
            self._status = status
            self.changed.set()

    def mark_stopping(self) -> None:
        """The service was asked to stop (safe from a signal handler)."""
        # No self.changed.set() here: a signal handler runs on the thread that may be inside
        # progress()'s set(), holding the event's lock. Operations polls for this instead.
        self._stopping = True

    @property
    def ready(self) -> bool:
        """Whether mark_ready() was called."""
        return self._ready

    @property
    def stopping(self) -> bool:
        """Whether mark_stopping() was called."""
        return self._stopping

    @property
    def status(self) -> str:
        """One line on what the service is doing, for systemd's STATUS=."""
        return self._status

    def progress_age(self) -> float | None:
        """Seconds since the loop last went round; None before it is ready."""
        last = self._last_progress
        return None if last is None else max(0.0, self._clock() - last)

    def report(self, timeout_s: float) -> tuple[bool, dict[str, Any]]:
        """(healthy, /healthz body): ready, not stopping, and progress within timeout_s."""
        age = self.progress_age()
        if not self._ready:
            state = "starting"
        elif self._stopping:
            state = "stopping"
        elif age is None or age > timeout_s:
            state = "stalled"
        else:
            state = "ok"
        body = {
            "status": state,
            "connected": self._ready,
            "last_progress_s": None if age is None else round(age, 3),
        }
        return state == "ok", body


# ---------------------------------------------------------------------- systemd


class SystemdNotifier:
    """sd_notify(3) over the NOTIFY_SOCKET datagram socket; does nothing when there is none."""

    def __init__(self, address: str = "", watchdog_s: float | None = None) -> None:
        # "@name" is a socket in the abstract namespace: its first byte is NUL on the wire.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s = watchdog_s

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> SystemdNotifier:
        """The notifier systemd asks for through NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID."""
        address = environ.get("NOTIFY_SOCKET", "")
        if address and not address.startswith(("/", "@")):
            logger.warning("NOTIFY_SOCKET=%r is not a unix socket; not notifying systemd", address)
            address = ""
        watchdog_s: float | None = None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for; a child inherits the variables.
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_s = int(usec) / 1e6
        return cls(address, watchdog_s)

    @property
    def enabled(self) -> bool:
        """Whether systemd listens (NOTIFY_SOCKET was set)."""
        return bool(self.address)

    def notify(self, *assignments: str) -> bool:
        """Send e.g. notify("READY=1", "STATUS=serving"); False when not sent."""
        if not self.enabled:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(assignments).encode())
        except OSError as e:
            logger.warning("cannot notify systemd: %s", e)
            return False
        return True


class _Supervisor:
    """A daemon thread: READY=1 once the service is ready, STATUS= when it changes, STOPPING=1,
    and WATCHDOG=1 every half watchdog interval while the service loop makes progress.
    """

    def __init__(self, notifier: SystemdNotifier, health: Health) -> None:
        self.notifier = notifier
        self.health = health
        self._closed = False
        self._sent_ready = False
        self._sent_stopping = False
        self._sent_status = ""
        self._withholding = False
        self._thread = threading.Thread(target=self._run, name="systemd-notify", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def close(self) -> None:
        """Send STOPPING=1 if not yet sent and stop the thread."""
        self.health.mark_stopping()
        self._closed = True
        self.health.changed.set()
        self._thread.join(5)

    def _run(self) -> None:
        interval = self.notifier.watchdog_s
        period = interval / 2 if interval else None
        next_ping = time.monotonic()
        while True:
            # close() marks the health stopping before it sets _closed: read _closed first, and
            # the last round below still sends STOPPING=1.
            closed = self._closed
            self._tell_state()
            if closed:
                return
            if interval and period and time.monotonic() >= next_ping:
                self._ping(interval)
                next_ping = time.monotonic() + period
            wait = _POLL_S if period is None else min(_POLL_S, next_ping - time.monotonic())
            self.health.changed.wait(max(0.0, wait))
            self.health.changed.clear()

    def _tell_state(self) -> None:
        health = self.health
        if health.stopping and not self._sent_stopping:
            self._sent_stopping = self.notifier.notify("STOPPING=1", "STATUS=stopping")
            return
        if health.stopping:
            return
        status = health.status
        if health.ready and not self._sent_ready:
            self._sent_ready = self.notifier.notify("READY=1", f"STATUS={status}")
            self._sent_status = status
        elif self._sent_ready and status != self._sent_status:
            self.notifier.notify(f"STATUS={status}")
            self._sent_status = status

    def _ping(self, interval: float) -> None:
        health = self.health
        age = health.progress_age()
        # Start-up (connecting, possibly retrying) and shutdown are bounded by systemd's own
        # TimeoutStartSec and TimeoutStopSec; in between only a loop that goes round earns a ping.
        if not health.ready or health.stopping or (age is not None and age < interval):
            if not self._withholding:
                self.notifier.notify("WATCHDOG=1")
                return
            logger.warning("service loop is making progress again; watchdog pings resume")
            self._withholding = False
            self._sent_status = health.status
            self.notifier.notify("WATCHDOG=1", f"STATUS={self._sent_status}")
        elif not self._withholding:
            self._withholding = True
            logger.error(
                "service loop stuck for %.0f s (watchdog %g s): withholding watchdog pings",
                age or 0.0,
                interval,
            )
            stuck = f"stuck for {age or 0.0:.0f} s; watchdog pings withheld"
            self.notifier.notify(f"STATUS={stuck}")


# ---------------------------------------------------------------------- HTTP


def finite(value: Any) -> Any:
    """value with every NaN or infinite float, at any depth, replaced by None (JSON null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def json_text(value: Any, **options: Any) -> str:
    """JSON text of value, non-finite floats as null: never the bare NaN that is not JSON."""
    return json.dumps(finite(value), allow_nan=False, **options)


# What GET /status answers (a JSON object); a service without one answers 404 there.
StatusSource = Callable[[], Mapping[str, Any]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: CollectorRegistry
    health: Health
    health_timeout_s: float
    status: StatusSource | None


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._answer(200, content_type, encoder(self.server.registry))
        elif path == "/healthz":
            healthy, body = self.server.health.report(self.server.health_timeout_s)
            self._answer(200 if healthy else 503, "application/json", json.dumps(body).encode())
        elif path == "/status" and self.server.status is not None:
            text = json_text(dict(self.server.status()), sort_keys=True)
            self._answer(200, "application/json", text.encode())
        else:
            self._answer(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

    def _answer(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Every scrape would otherwise print a line on stderr.
        logger.debug("%s %s", self.address_string(), format % args)


class MetricsServer:
    """GET /metrics (the registry's exposition), GET /healthz and, when given a status source,
    GET /status (its JSON), from a daemon thread."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Health,
        host: str,
        port: int,
        timeout_s: float,
        status: StatusSource | None = None,
    ) -> None:
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), _Handler)
        except (OSError, OverflowError) as e:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {e}") from e
        self._server.registry = registry
        self._server.health = health
        self._server.health_timeout_s = timeout_s
        self._server.status = status
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen by the system when asked for 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve from the daemon thread."""
        self._thread.start()
        logger.info("serving /metrics and /healthz on port %d", self.port)

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()


# ---------------------------------------------------------------------- both


class OpsSettings(Protocol):
    """The settings fields Operations reads (both services' settings have them)."""

    @property
    def metrics_port(self) -> int: ...
    @property
    def metrics_host(self) -> str: ...
    @property
    def health_timeout_s(self) -> float: ...


class Operations:
    """The HTTP endpoint (when metrics_port is not 0) and systemd notifications (under
    systemd) of one service, for as long as the `with` block lasts.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Health,
        settings: OpsSettings,
        environ: Mapping[str, str] | None = None,
        status: StatusSource | None = None,
    ) -> None:
        self.health = health
        self.server: MetricsServer | None = None
        if settings.metrics_port:
            self.server = MetricsServer(
                registry,
                health,
                settings.metrics_host,
                settings.metrics_port,
                settings.health_timeout_s,
                status,
            )
        notifier = SystemdNotifier.from_environ(os.environ if environ is None else environ)
        self._supervisor = _Supervisor(notifier, health) if notifier.enabled else None

    def __enter__(self) -> Operations:
        if self.server is not None:
            self.server.start()
        if self._supervisor is not None:
            self._supervisor.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._supervisor is not None:
            self._supervisor.close()
        if self.server is not None:
            self.server.close()
