"""`fedq broker add-worker NAME`: a worker's broker user, task queue and least privileges.

The user may publish to the updates exchange (updates, hellos and failure reports) and read its
own task queue, and nothing else: it cannot configure anything, publish tasks (models), jobs or
dead letters, or read another queue. A task it refuses is rejected without requeue, and the
broker dead-letters it (with an x-death header) through the queue's dead-letter exchange. Its
queue is declared here, by an administrator, so the worker runs with declare_topology=False and
only checks the queue passively. The user is made with rabbitmqctl, or with the management HTTP
API (--management-url http://admin:secret@host:15672). A user that exists (users are shared by
all vhosts) keeps its password, so that re-running add-worker to repair a queue or for another
vhost does not lock out a running site; --reset-password gives it a new one.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from broker.topology import Topology
from shared.errors import ConfigError, FedqError


@dataclass(frozen=True)
class Permissions:
    """The three permission regexes of one user on one vhost."""

    configure: str
    write: str
    read: str


def worker_permissions(topology: Topology, worker_id: str) -> Permissions:
    """Configure nothing; write only the updates exchange; read only its task queue.

    Not the dead exchange: what a site wrote there would read as the aggregator's verdicts."""
    prefix = re.escape(topology.prefix)
    queue = re.escape(topology.task_queue(worker_id))
    return Permissions(configure="^$", write=f"^{prefix}\\.updates$", read=f"^{queue}$")


def set_user_rabbitmqctl(
    name: str,
    password: str,
    vhost: str,
    permissions: Permissions,
    ctl: str = "rabbitmqctl",
    *,
    reset_password: bool = False,
) -> bool:
    """Create the user and set its permissions with rabbitmqctl; True when the password was set.

    A user that exists keeps its password unless reset_password: users are shared by all vhosts,
    so re-running add-worker (to repair a queue, or for another vhost) must not lock out a site
    that is running on the old password."""
    users = _ctl(ctl, "list_users", "--quiet", "--no-table-headers")
    exists = any(line.split("\t")[0].strip() == name for line in users.splitlines())
    # The password goes on stdin: never on a command line, where `ps` shows it and a leading
    # "-" would read as an option.
    if not exists:
        _ctl(ctl, "add_user", name, stdin=password)
    elif reset_password:
        _ctl(ctl, "change_password", name, stdin=password)
    _ctl(
        ctl,
        "set_permissions",
        "-p",
        vhost,
        name,
        permissions.configure,
        permissions.write,
        permissions.read,
    )
    return reset_password or not exists


def _ctl(ctl: str, *args: str, stdin: str | None = None) -> str:
    try:
        done = subprocess.run([ctl, *args], input=stdin, capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise FedqError(f"cannot run {ctl}: {e}") from e
    if done.returncode != 0:
        raise FedqError(f"{ctl} {args[0]} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def set_user_management(
    url: str,
    name: str,
    password: str,
    vhost: str,
    permissions: Permissions,
    *,
    reset_password: bool = False,
) -> bool:
    """Create the user and set its permissions through the management HTTP API; True when the
    password was set (a user that exists keeps it unless reset_password, as with rabbitmqctl)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    base = urllib.parse.urlunsplit(parts._replace(netloc=host)).rstrip("/")
    user = urllib.parse.unquote(parts.username or "guest")
    secret = urllib.parse.unquote(parts.password or "guest")
    auth = base64.b64encode(f"{user}:{secret}".encode()).decode()
    user_url = f"{base}/api/users/{_quote(name)}"
    # A PUT on an existing user replaces its password (and tags): only for a new one, or on demand.
    password_set = reset_password or not _exists(user_url, auth)
    if password_set:
        _put(user_url, {"password": password, "tags": ""}, auth)
    body = {"configure": permissions.configure, "write": permissions.write}
    _put(
        f"{base}/api/permissions/{_quote(vhost)}/{_quote(name)}",
        body | {"read": permissions.read},
        auth,
    )
    return password_set


def _quote(text: str) -> str:
    """Percent-encode one path segment (a vhost "/" becomes %2F)."""
    return urllib.parse.quote(text, safe="")


def _exists(url: str, auth: str) -> bool:
    """Whether a GET of url answers (False on 404)."""
    request = urllib.request.Request(url, headers={"authorization": f"Basic {auth}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise FedqError(f"management API: GET {url} answered {e.code}: {e.read()[:200]!r}") from e
    except (urllib.error.URLError, OSError) as e:
        raise FedqError(f"management API at {url} unreachable: {e}") from e
    return True


def _put(url: str, body: dict[str, str], auth: str) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"content-type": "application/json", "authorization": f"Basic {auth}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
    except urllib.error.HTTPError as e:
        raise FedqError(f"management API: PUT {url} answered {e.code}: {e.read()[:200]!r}") from e
    except (urllib.error.URLError, OSError) as e:
        raise FedqError(f"management API at {url} unreachable: {e}") from e


def declare_worker_queue(admin_url: str, topology: Topology, worker_id: str) -> None:
    """Declare the shared topology and the worker's task queue and binding, as an admin."""
    from broker.rabbitmq import RabbitMQTransport

    transport = RabbitMQTransport(admin_url, topology, connection_name="fedq broker add-worker")
    try:
        transport.declare()
        transport.declare_worker(worker_id)
    finally:
        transport.close()


@dataclass(frozen=True)
class AddedWorker:
    """What add_worker did: the permissions, and whether it set the password (new user or reset)."""

    permissions: Permissions
    password_set: bool


def add_worker(
    name: str,
    password: str,
    *,
    vhost: str,
    topology: Topology,
    admin_url: str,
    management_url: str = "",
    ctl: str = "rabbitmqctl",
    reset_password: bool = False,
) -> AddedWorker:
    """Create the worker's queue, user and permissions; a user that exists keeps its password
    unless reset_password."""
    permissions = worker_permissions(topology, name)
    declare_worker_queue(admin_url, topology, name)
    if management_url:
        password_set = set_user_management(
            management_url, name, password, vhost, permissions, reset_password=reset_password
        )
    else:
        password_set = set_user_rabbitmqctl(
            name, password, vhost, permissions, ctl, reset_password=reset_password
        )
    return AddedWorker(permissions, password_set)


def broker_main(argv: Sequence[str] | None = None) -> int:
    """`fedq broker add-worker NAME ...`."""
    parser = argparse.ArgumentParser(prog="fedq broker", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add-worker", help="create a worker's user, task queue and permissions")
    add.add_argument("name", help="the worker id, also its broker user name")
    add.add_argument("--vhost", default="fedq")
    add.add_argument("--prefix", default=os.environ.get("FEDQ_PREFIX", "fedq"))
    secret = add.add_mutually_exclusive_group()
    secret.add_argument("--password", help="default: a new random one, printed")
    secret.add_argument("--password-file", dest="password_file", help="file holding it")
    add.add_argument(
        "--reset-password",
        dest="reset_password",
        action="store_true",
        help="give a user that exists this (or a new) password; by default it keeps its own",
    )
    add.add_argument(
        "--admin-url",
        dest="admin_url",
        help="amqp(s):// URL of an administrator on the vhost, to declare the queue "
        "(default amqp://guest:guest@localhost:5672/VHOST)",
    )
    backend = add.add_mutually_exclusive_group()
    backend.add_argument(
        "--management-url",
        dest="management_url",
        default="",
        help="http://admin:secret@host:15672: make the user with the management API",
    )
    backend.add_argument(
        "--rabbitmqctl", default="rabbitmqctl", help="make the user with this rabbitmqctl (default)"
    )
    args = parser.parse_args(argv)
    topology = Topology(args.prefix)
    topology.task_queue(args.name)  # validates the name
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as fh:
            password = fh.read().strip()
    else:
        password = args.password or ""
    generated = not password and not args.password_file
    if not password:
        if args.password_file:
            raise ConfigError(f"{args.password_file} is empty")
        password = secrets.token_urlsafe(24)
    admin_url = args.admin_url or (
        "amqp://guest:guest@localhost:5672/" + urllib.parse.quote(args.vhost, safe="")
    )
    added = add_worker(
        args.name,
        password,
        vhost=args.vhost,
        topology=topology,
        admin_url=admin_url,
        management_url=args.management_url,
        ctl=args.rabbitmqctl,
        reset_password=args.reset_password,
    )
    permissions = added.permissions
    print(
        f"worker {args.name}: queue {topology.task_queue(args.name)} on vhost {args.vhost}; "
        f"configure {permissions.configure!r} write {permissions.write!r} "
        f"read {permissions.read!r}",
        file=sys.stderr,
    )
    if not added.password_set:
        print(
            f"user {args.name} exists; its password is unchanged "
            "(--reset-password to make a new one)",
            file=sys.stderr,
        )
    elif generated:
        print(password)
    return 0
