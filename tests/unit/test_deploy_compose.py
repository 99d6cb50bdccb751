"""Offline tests of deploy/docker-compose.yml, the Dockerfiles and the RabbitMQ definitions: the
files they reference exist, FEDQ_* variables name real settings with valid values, ports agree
with Prometheus' targets, the broker definitions match broker/topology.py, and each user's
permissions allow what the services do and nothing that least privilege forbids.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from aggregator.settings import AggregatorSettings
from broker.rabbitmq import _DEAD_QUEUE_ARGUMENTS
from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY, Topology
from shared.settings import load_settings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DEFINITIONS = DEPLOY / "rabbitmq" / "definitions.json"
TARGETS = DEPLOY / "prometheus" / "targets"
T = Topology("fedq")
# Read by the command line, not a setting (docs/usage.md#settings).
NOT_SETTINGS = {"FEDQ_LOG_LEVEL"}
# `fedq submit` reads only these two.
SUBMIT_VARIABLES = {"FEDQ_BROKER", "FEDQ_PREFIX"}
OPERATOR_USERS = {"admin", "aggregator", "submitter"}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def role(service: dict[str, Any]) -> str:
    """aggregator, worker or submit: the fedq command a service runs; "" for the others."""
    if not service.get("image", "").startswith("fedq:"):
        return ""
    # The fedq images' ENTRYPOINT is ["fedq"].
    command = [*service.get("entrypoint", ["fedq"]), *service.get("command", [])]
    assert command[0] == "fedq", command
    return str(command[1])


def fedq_services(kind: str | None = None) -> dict[str, dict[str, Any]]:
    return {
        name: s for name, s in services().items() if role(s) and (kind is None or role(s) == kind)
    }


def definitions() -> dict[str, Any]:
    return json.loads(DEFINITIONS.read_text(encoding="utf-8"))


def rabbit_password_matches(password_hash: str, password: str) -> bool:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt(4) + sha256(salt + password))."""
    raw = base64.b64decode(password_hash)
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def target_ports(*files: str) -> dict[str, int]:
    """host -> port of the Prometheus file_sd targets in these files."""
    out = {}
    for name in files:
        for entry in yaml.safe_load((TARGETS / name).read_text(encoding="utf-8")):
            for target in entry["targets"]:
                host, port = target.rsplit(":", 1)
                out[host] = int(port)
    return out


# ---------------------------------------------------------------------- compose


def test_every_host_path_the_compose_file_mounts_or_builds_from_exists() -> None:
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in compose()["volumes"], f"{name}: undeclared volume {source}"
        if "build" in service:
            context = DEPLOY / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), name


@pytest.mark.parametrize(
    ("kind", "settings_class"), [("aggregator", AggregatorSettings), ("worker", WorkerSettings)]
)
def test_every_fedq_variable_of_a_service_names_a_setting_and_parses(
    kind: str, settings_class: type
) -> None:
    fields = {f"FEDQ_{name.upper()}" for name in settings_class.__dataclass_fields__}
    for name, service in fedq_services(kind).items():
        environment = {k: str(v) for k, v in service["environment"].items()}
        unknown = {k for k in environment if k.startswith("FEDQ_")} - fields - NOT_SETTINGS
        assert unknown == set(), name

        settings = load_settings(settings_class, None, environment, {})

        assert settings.metrics_port > 0, name


def test_the_submit_tool_sets_only_what_fedq_submit_reads() -> None:
    (submit,) = fedq_services("submit").values()

    assert set(submit["environment"]) <= SUBMIT_VARIABLES
    # The image holds deploy/jobs as /opt/fedq/jobs, the submit tool's working directory.
    assert (ROOT / "deploy" / submit["command"][0]).is_file()


def test_workers_have_distinct_ids_data_volumes_and_partitions() -> None:
    workers = fedq_services("worker")
    settings = {
        name: load_settings(WorkerSettings, None, {k: str(v) for k, v in w["environment"].items()})
        for name, w in workers.items()
    }
    data_volumes = [
        volume.split(":")[0]
        for w in workers.values()
        for volume in w["volumes"]
        if volume.split(":")[1] == "/data"
    ]

    assert len(workers) >= 3
    assert len({s.worker_id for s in settings.values()}) == len(workers)
    assert len(set(data_volumes)) == len(workers)
    for name, s in settings.items():
        assert bool(s.data) != bool(s.dataset), f"{name}: exactly one of FEDQ_DATA, FEDQ_DATASET"
        assert 0 <= s.partition_index < s.num_partitions, name
    assert len({(s.num_partitions, s.partition_index) for s in settings.values()}) == len(workers)
    assert len({s.num_partitions for s in settings.values()}) == 1


def test_the_aggregator_keeps_its_state_on_a_volume() -> None:
    (aggregator,) = fedq_services("aggregator").values()
    mounts = dict(volume.split(":")[:2] for volume in aggregator["volumes"])

    assert aggregator["environment"]["FEDQ_STATE_DIR"] in mounts.values()


def test_metrics_ports_match_prometheus_targets_and_healthchecks() -> None:
    targets = target_ports("aggregator.yml", "workers.yml", "workers-gpu.yml.example")

    for name, service in fedq_services().items():
        if role(service) == "submit":
            continue
        port = int(service["environment"]["FEDQ_METRICS_PORT"])
        assert targets[name] == port, name
        probe = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/healthz" in probe, name


def test_every_fedq_service_waits_for_a_healthy_rabbitmq() -> None:
    for name, service in fedq_services().items():
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name


def test_rabbitmq_is_4_with_a_ping_healthcheck_plugins_config_and_definitions() -> None:
    rabbit = services()["rabbitmq"]
    mounts = dict(volume.split(":")[:2] for volume in rabbit["volumes"])
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text(encoding="utf-8")
    (definitions_path,) = re.findall(r"^load_definitions\s*=\s*(\S+)$", conf, re.M)

    assert rabbit["image"] == "rabbitmq:4-management"
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert rabbit["hostname"]  # quorum queue data is tied to the node name
    assert mounts["./rabbitmq/definitions.json"] == definitions_path
    assert mounts["./rabbitmq/enabled_plugins"] == "/etc/rabbitmq/enabled_plugins"
    assert mounts["./rabbitmq/rabbitmq.conf"].startswith("/etc/rabbitmq/conf.d/")
    assert target_ports("rabbitmq.yml") == {"rabbitmq": 15692}


def test_only_the_gpu_profile_reserves_an_nvidia_gpu() -> None:
    for name, service in services().items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        devices = devices.get("devices", [])
        if name == "worker-gpu":
            assert service["profiles"] == ["gpu"]
            assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile.cuda"
            assert service["environment"]["FEDQ_DEVICE"].startswith("cuda")
            (device,) = devices
            assert device["driver"] == "nvidia"
            assert "gpu" in device["capabilities"]
        else:
            assert devices == [], name


def test_every_broker_url_logs_in_as_a_defined_user_with_its_password() -> None:
    users = {user["name"]: user for user in definitions()["users"]}

    for name, service in fedq_services().items():
        url = urlsplit(service["environment"]["FEDQ_BROKER"])
        assert url.hostname == "rabbitmq", name
        assert url.path == "/fedq", name
        assert url.username in users, name
        user = users[url.username]
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert rabbit_password_matches(user["password_hash"], url.password or ""), name
        if role(service) == "worker":
            assert url.username == service["environment"]["FEDQ_WORKER_ID"], name


def test_the_aggregator_takes_jobs_only_from_the_submitter_and_updates_only_under_user_ids() -> (
    None
):
    (aggregator,) = fedq_services("aggregator").values()
    (submit,) = fedq_services("submit").values()
    settings = load_settings(AggregatorSettings, None, aggregator["environment"], {})
    submitter = urlsplit(submit["environment"]["FEDQ_BROKER"]).username
    defined = {user["name"] for user in definitions()["users"]}

    assert settings.require_user_id is True
    assert settings.job_submitters == (submitter,)
    assert submitter in defined
    assert all(
        w["environment"]["FEDQ_STAMP_USER_ID"] == "true" for w in fedq_services("worker").values()
    )


# ---------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize(
    ("dockerfile", "torch_index"),
    [
        ("Dockerfile", "download.pytorch.org/whl/cpu"),
        ("Dockerfile.cuda", "download.pytorch.org/whl/cu"),
    ],
)
def test_a_dockerfile_copies_existing_paths_kept_by_its_dockerignore(
    dockerfile: str, torch_index: str
) -> None:
    text = (DEPLOY / "docker" / dockerfile).read_text(encoding="utf-8")
    ignore = (DEPLOY / "docker" / f"{dockerfile}.dockerignore").read_text(encoding="utf-8")
    kept = [line[1:].rstrip("/") for line in ignore.splitlines() if line.startswith("!")]
    sources = [
        source
        for line in text.splitlines()
        if line.startswith("COPY ") and "--from" not in line
        for source in line.split()[1:-1]
    ]

    assert re.findall(r"^FROM .*$", text, re.M) == ["FROM python:3.11-slim"]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source == k or source.startswith(k + "/") for k in kept), source
    assert torch_index in text
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert 'ENTRYPOINT ["fedq"]' in text


# ---------------------------------------------------------------------- definitions


def test_definitions_declare_the_topology_exchanges_with_their_types() -> None:
    exchanges = {e["name"]: e for e in definitions()["exchanges"] if e["vhost"] == "fedq"}

    assert {name: e["type"] for name, e in exchanges.items()} == {
        T.jobs: "direct",
        T.updates: "direct",
        T.dead: "fanout",
        T.tasks: "direct",
    }
    assert all(e["durable"] and not e["auto_delete"] for e in exchanges.values())


def test_definitions_declare_the_topology_queues_with_exactly_its_arguments() -> None:
    defs = definitions()
    queues = {q["name"]: q for q in defs["queues"] if q["vhost"] == "fedq"}
    workers = {u["name"] for u in defs["users"]} - OPERATOR_USERS
    expected = {
        T.jobs: T.jobs_queue_arguments(),
        T.updates: T.updates_queue_arguments(),
        T.dead: _DEAD_QUEUE_ARGUMENTS,
    } | {T.task_queue(worker): T.queue_arguments() for worker in workers}

    assert {name: q["arguments"] for name, q in queues.items()} == expected
    assert all(q["durable"] and not q["auto_delete"] for q in queues.values())
    assert queues[T.jobs]["arguments"]["x-single-active-consumer"] is True
    assert queues[T.updates]["arguments"]["x-single-active-consumer"] is True


def test_definitions_set_the_delivery_limit_policy_on_the_updates_and_task_queues_only() -> None:
    defs = definitions()
    queues = [q["name"] for q in defs["queues"] if q["vhost"] == "fedq"]

    (policy,) = defs["policies"]

    assert policy == {"vhost": "fedq", **T.delivery_limit_policy()}
    limited = {name for name in queues if re.match(policy["pattern"], name)}
    assert limited == {name for name in queues if name not in (T.jobs, T.dead)}
    assert T.updates in limited and len(limited) > 1


def test_definitions_bind_every_queue_as_the_services_do() -> None:
    defs = definitions()
    workers = {u["name"] for u in defs["users"]} - OPERATOR_USERS
    bindings = {
        (b["source"], b["destination"], b["routing_key"])
        for b in defs["bindings"]
        if b["vhost"] == "fedq" and b["destination_type"] == "queue"
    }

    assert bindings == {
        (T.jobs, T.jobs, JOB_ROUTING_KEY),
        (T.updates, T.updates, UPDATE_ROUTING_KEY),
        (T.dead, T.dead, ""),
    } | {(T.tasks, T.task_queue(worker), worker) for worker in workers}


def test_every_compose_worker_has_a_user_and_a_task_queue_in_the_definitions() -> None:
    defs = definitions()
    users = {u["name"] for u in defs["users"]}
    queues = {q["name"] for q in defs["queues"]}

    for service in fedq_services("worker").values():
        worker_id = service["environment"]["FEDQ_WORKER_ID"]
        assert worker_id in users
        assert T.task_queue(worker_id) in queues


# What each role touches, by RabbitMQ's access rules: exchange.declare and queue.declare need
# configure on the resource; queue.bind needs write on the queue and read on the exchange;
# basic.publish needs write on the exchange (amq.default for the default exchange);
# basic.consume and basic.get need read on the queue. The aggregator and `fedq submit` declare
# actively (broker/rabbitmq.py: _declare_shared); a worker, with FEDQ_DECLARE_TOPOLOGY=false, only
# checks its queue passively, which needs no permission.
def needs(user: str) -> dict[str, tuple[set[str], set[str]]]:
    """permission -> (names it must match, names it must not match) for one user."""
    shared = {T.jobs, T.updates, T.dead, T.tasks}
    other = T.task_queue("someone-else")
    if user == "aggregator":
        return {
            "configure": (shared, {other}),
            "write": (shared, {other, "amq.default"}),
            "read": ({T.jobs, T.updates, T.dead}, {T.tasks, other}),
        }
    if user == "submitter":
        return {
            "configure": (shared, {other}),
            "write": ({T.jobs, T.updates, T.dead}, {T.tasks, other, "amq.default"}),
            "read": ({T.jobs, T.updates, T.dead}, {T.tasks, other}),
        }
    own = T.task_queue(user)
    everything = {T.jobs, T.updates, T.dead, T.tasks, own, other}
    return {
        # Workers declare nothing (FEDQ_DECLARE_TOPOLOGY=false): their queue is only checked.
        "configure": (set(), everything),
        # Never publish models, jobs or dead letters (the broker dead-letters a refused task).
        "write": ({T.updates}, {T.tasks, T.jobs, T.dead, own, other, "amq.default"}),
        "read": ({own}, {T.jobs, T.updates, T.dead, T.tasks, other}),
    }


def test_site_permissions_are_those_fedq_broker_add_worker_sets() -> None:
    from broker.admin import worker_permissions

    for p in definitions()["permissions"]:
        if p["user"].startswith("site-"):
            w = worker_permissions(T, p["user"])
            assert (p["configure"], p["write"], p["read"]) == (w.configure, w.write, w.read)


def test_every_service_user_may_do_what_its_service_does_and_no_more() -> None:
    defs = definitions()
    permissions = {p["user"]: p for p in defs["permissions"] if p["vhost"] == "fedq"}
    users = {u["name"] for u in defs["users"]} - {"admin"}

    assert users <= set(permissions)
    for user in users:
        for permission, (allowed, forbidden) in needs(user).items():
            pattern = re.compile(permissions[user][permission])
            # RabbitMQ matches permission regexes unanchored, like re.search.
            assert {n for n in allowed if not pattern.search(n)} == set(), (user, permission)
            assert {n for n in forbidden if pattern.search(n)} == set(), (user, permission)


def test_only_the_admin_user_has_management_tags() -> None:
    tags = {u["name"]: u["tags"] for u in definitions()["users"]}

    assert tags.pop("admin") == ["administrator"]
    assert all(t == [] for t in tags.values())
