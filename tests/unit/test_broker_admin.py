"""`fedq broker add-worker`'s pieces that need no broker: the permission regexes and the
management API calls (against a local stand-in server)."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from broker.admin import set_user_management, worker_permissions
from broker.topology import Topology


def test_worker_permissions_allow_updates_and_its_own_queue_only() -> None:
    p = worker_permissions(Topology("fedq"), "site-a")
    assert (p.configure, p.read) == ("^$", r"^fedq\.tasks\.site\-a$")
    assert re.search(p.write, "fedq.updates")
    for refused in ("fedq.tasks", "fedq.jobs", "fedq.dead", "fedqxupdates", "fedq.updates.x"):
        assert not re.search(p.write, refused)
    assert re.search(p.read, "fedq.tasks.site-a")
    for refused in ("fedq.tasks.site-b", "fedq.tasks.site-ab", "fedq.updates", "fedq.tasks"):
        assert not re.search(p.read, refused)
    assert not re.search(p.configure, "fedq.tasks.site-a")


@pytest.fixture
def management() -> Iterator[tuple[str, list[tuple[str, str, dict[str, Any]]]]]:
    seen: list[tuple[str, str, dict[str, Any]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append((self.path, self.headers["authorization"], body))
            self.send_response(201)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://admin:s%40cret@127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_the_management_api_gets_the_user_and_its_permissions(
    management: tuple[str, list[tuple[str, str, dict[str, Any]]]],
) -> None:
    url, seen = management
    p = worker_permissions(Topology("fedq"), "site-a")
    set_user_management(url, "site-a", "pw", "fedq", p)
    auth = "Basic " + base64.b64encode(b"admin:s@cret").decode()
    assert seen == [
        ("/api/users/site-a", auth, {"password": "pw", "tags": ""}),
        (
            "/api/permissions/fedq/site-a",
            auth,
            {"configure": p.configure, "write": p.write, "read": p.read},
        ),
    ]
