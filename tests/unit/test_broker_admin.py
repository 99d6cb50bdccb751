"""`fedq broker add-worker`'s pieces that need no broker: the permission regexes and the
management API calls (against a local stand-in server)."""

from __future__ import annotations

import base64
import json
import re
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import broker.admin
from broker.admin import (
    broker_main,
    set_user_management,
    set_user_rabbitmqctl,
    worker_permissions,
)
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


Seen = list[tuple[str, str, dict[str, Any]]]


@pytest.fixture
def management() -> Iterator[tuple[str, Seen, set[str]]]:
    """A stand-in management API: the requests it saw, and the users it has (add to them)."""
    seen: Seen = []
    users: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(("GET " + self.path, self.headers["authorization"], {}))
            found = self.path.rpartition("/")[2] in users
            self.send_response(200 if found else 404)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def do_PUT(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append(("PUT " + self.path, self.headers["authorization"], body))
            self.send_response(201)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://admin:s%40cret@127.0.0.1:{server.server_address[1]}", seen, users
    finally:
        server.shutdown()
        server.server_close()


AUTH = "Basic " + base64.b64encode(b"admin:s@cret").decode()


def test_the_management_api_gets_the_user_and_its_permissions(
    management: tuple[str, Seen, set[str]],
) -> None:
    url, seen, _ = management
    p = worker_permissions(Topology("fedq"), "site-a")
    assert set_user_management(url, "site-a", "pw", "fedq", p) is True
    assert seen == [
        ("GET /api/users/site-a", AUTH, {}),
        ("PUT /api/users/site-a", AUTH, {"password": "pw", "tags": ""}),
        (
            "PUT /api/permissions/fedq/site-a",
            AUTH,
            {"configure": p.configure, "write": p.write, "read": p.read},
        ),
    ]


def test_the_management_api_keeps_an_existing_users_password_and_sets_its_permissions(
    management: tuple[str, Seen, set[str]],
) -> None:
    url, seen, users = management
    users.add("site-a")
    p = worker_permissions(Topology("fedq"), "site-a")
    assert set_user_management(url, "site-a", "pw", "other", p) is False
    assert [request for request, _, _ in seen] == [
        "GET /api/users/site-a",
        "PUT /api/permissions/other/site-a",
    ]


def test_the_management_api_resets_an_existing_users_password_only_when_asked(
    management: tuple[str, Seen, set[str]],
) -> None:
    url, seen, users = management
    users.add("site-a")
    p = worker_permissions(Topology("fedq"), "site-a")
    assert set_user_management(url, "site-a", "new", "fedq", p, reset_password=True) is True
    assert ("PUT /api/users/site-a", AUTH, {"password": "new", "tags": ""}) in seen


def _fake_rabbitmqctl(tmp_path: Path, users: str) -> tuple[str, Path]:
    """A rabbitmqctl that knows the users listed and logs each call (and its stdin) to a file."""
    log = tmp_path / "calls.jsonl"
    script = tmp_path / "rabbitmqctl"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "stdin = '' if args[0] == 'list_users' else sys.stdin.read()\n"
        f"with open({str(log)!r}, 'a') as fh:\n"
        "    fh.write(json.dumps([args, stdin]) + '\\n')\n"
        "if args[0] == 'list_users':\n"
        f"    sys.stdout.write({users!r})\n"
    )
    script.chmod(0o755)
    return str(script), log


def _calls(log: Path) -> list[tuple[str, str]]:
    return [(args[0], stdin) for args, stdin in map(json.loads, log.read_text().splitlines())]


def test_rabbitmqctl_makes_a_new_user_with_the_password_on_stdin(tmp_path: Path) -> None:
    ctl, log = _fake_rabbitmqctl(tmp_path, "guest\t[administrator]\n")
    p = worker_permissions(Topology("fedq"), "site-a")
    assert set_user_rabbitmqctl("site-a", "pw", "fedq", p, ctl) is True
    assert _calls(log) == [("list_users", ""), ("add_user", "pw"), ("set_permissions", "")]


def test_rabbitmqctl_keeps_an_existing_users_password_and_sets_its_permissions(
    tmp_path: Path,
) -> None:
    ctl, log = _fake_rabbitmqctl(tmp_path, "guest\t[administrator]\nsite-a\t[]\n")
    p = worker_permissions(Topology("fedq"), "site-a")
    assert set_user_rabbitmqctl("site-a", "pw", "other", p, ctl) is False
    assert _calls(log) == [("list_users", ""), ("set_permissions", "")]


def test_rabbitmqctl_resets_an_existing_users_password_only_when_asked(tmp_path: Path) -> None:
    ctl, log = _fake_rabbitmqctl(tmp_path, "site-a\t[]\n")
    p = worker_permissions(Topology("fedq"), "site-a")
    assert set_user_rabbitmqctl("site-a", "new", "fedq", p, ctl, reset_password=True) is True
    assert _calls(log) == [("list_users", ""), ("change_password", "new"), ("set_permissions", "")]


def test_add_worker_on_an_existing_user_says_its_password_is_unchanged_and_prints_none(
    management: tuple[str, Seen, set[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, seen, users = management
    users.add("site-a")
    monkeypatch.setattr(broker.admin, "declare_worker_queue", lambda *args: None)
    assert broker_main(["add-worker", "site-a", "--management-url", url]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "user site-a exists; its password is unchanged (--reset-password" in err
    assert not any(request.startswith("PUT /api/users/") for request, _, _ in seen)


def test_add_worker_with_reset_password_prints_the_new_password_it_set(
    management: tuple[str, Seen, set[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, seen, users = management
    users.add("site-a")
    monkeypatch.setattr(broker.admin, "declare_worker_queue", lambda *args: None)
    assert broker_main(["add-worker", "site-a", "--management-url", url, "--reset-password"]) == 0
    password = capsys.readouterr().out.strip()
    assert len(password) >= 24
    assert ("PUT /api/users/site-a", AUTH, {"password": password, "tags": ""}) in seen
