"""A real Prometheus (Debian's package) scrapes a live federation with deploy/'s scrape
configuration, and every query of the Grafana dashboard returns data.

The aggregator and two workers run as processes over RabbitMQ with their metrics on free ports;
RabbitMQ's rabbitmq_prometheus plugin (enabled here for the test when it is not, and disabled
again afterwards) serves the queue metrics. Prometheus gets deploy/prometheus/prometheus.yml with
the same jobs, relabelling and alert rules, but target files that point at this test's ports and
a 1 s scrape interval.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from rabbitmq_scratch import Scratch, Spawn

from broker.topology import JOB_ROUTING_KEY
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig
from shared.messages import Job, encode_message

pytestmark = pytest.mark.rabbitmq

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fedq.json"
RABBITMQ_PROMETHEUS = "127.0.0.1:15692"
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval for a 1 s scrape interval is 4 s at least
VERSIONS = 8  # model versions Prometheus must have seen before the queries are checked

# Dashboard queries that have no series in a healthy run: their counters have a `reason` label,
# and a labelled counter has no series before its first event.
NO_DATA_WITHOUT_AN_EVENT = {
    "sum by (reason) (rate(fedq_aggregator_updates_rejected_total[$__rate_interval])) * 60":
        "no update is dead-lettered in a healthy run",
    'sum by (worker, reason) (increase(fedq_worker_tasks_failed_total{worker=~"$worker"}'
    "[$__rate_interval]))":
        "no task fails (malformed, wrong_worker, training_error) in a healthy run",
}  # fmt: skip

SPEC = JobSpec(
    name="prometheus",
    model=ModelSpec("mlp", (1, 8, 8), 10),
    dataset="digits",
    strategy=StrategyConfig(name="fedasync", alpha=0.5, min_workers=2),
    training=TrainingConfig(batch_size=32, lr=0.05),
    # Long enough to still be running while the queries are checked; the test stops it.
    stop=StopConfig(max_versions=100_000, max_time_s=120.0),
)


def _required(why: str) -> None:
    """Fail under CI=true, else skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; CI=true needs it", pytrace=False)
    pytest.skip(f"{why} (skipped outside CI; with CI=true this fails)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def _answers(url: str) -> bool:
    try:
        _get(url, timeout=2.0)
    except (OSError, urllib.error.URLError):
        return False
    return True


def _plugins(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmq-plugins", *flags], capture_output=True, text=True, timeout=120, check=False
    )


def _enabled_plugins_file() -> Path | None:
    found = subprocess.run(
        ["rabbitmqctl", "eval", "application:get_env(rabbit, enabled_plugins_file)."],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    text = found.stdout.strip()  # {ok,"/etc/rabbitmq/enabled_plugins"}
    if found.returncode != 0 or not text.startswith('{ok,"'):
        return None
    return Path(text[len('{ok,"') : -len('"}')])


@pytest.fixture(scope="module")
def rabbitmq_metrics(amqp_url: str) -> Iterator[str]:
    """RabbitMQ's Prometheus endpoint; the plugin is enabled for the test if it is not."""
    per_object = f"http://{RABBITMQ_PROMETHEUS}/metrics/per-object"
    if _answers(per_object):
        yield RABBITMQ_PROMETHEUS
        return
    if shutil.which("rabbitmq-plugins") is None:
        _required(f"rabbitmq_prometheus does not answer on {RABBITMQ_PROMETHEUS}")
    plugins_file = _enabled_plugins_file()
    before = plugins_file.read_bytes() if plugins_file and plugins_file.exists() else None
    enabled = _plugins("enable", "rabbitmq_prometheus")
    try:
        deadline = time.monotonic() + 30
        while not _answers(per_object) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not _answers(per_object):
            _required(
                f"rabbitmq-plugins enable rabbitmq_prometheus did not make {per_object} answer: "
                f"{enabled.stdout[-500:]}{enabled.stderr[-500:]}"
            )
        yield RABBITMQ_PROMETHEUS
    finally:  # leave the broker's plugins as they were
        _plugins("disable", "rabbitmq_prometheus")
        if plugins_file is not None:
            if before is None:
                plugins_file.unlink(missing_ok=True)
            else:
                plugins_file.write_bytes(before)


def _prometheus_config(tmp_path: Path, aggregator: int, workers: list[int], rabbitmq: str) -> Path:
    """deploy/'s configuration with this test's targets, scraped every second."""
    config: dict[str, Any] = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(SCRAPE_CONFIG.parent / f) for f in config.get("rule_files", [])]
    # The first worker names its site, the second is named by the relabelling (its host).
    targets: dict[str, list[dict[str, Any]]] = {
        "fedq-aggregator": [{"targets": [f"127.0.0.1:{aggregator}"]}],
        "fedq-worker": [
            {"targets": [f"127.0.0.1:{workers[0]}"], "labels": {"worker": "site-a"}},
            {"targets": [f"127.0.0.1:{workers[1]}"]},
        ],
        "rabbitmq": [{"targets": [rabbitmq]}],
    }
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(targets), f"deploy/ scrapes {sorted(jobs)}"
    for name, job in jobs.items():
        target_file = tmp_path / f"targets-{name}.yml"
        target_file.write_text(yaml.safe_dump(targets[name]), encoding="utf-8")
        job["file_sd_configs"] = [{"files": [str(target_file)]}]
    # deploy/'s rabbitmq.conf sets return_per_object_metrics; the test broker may not.
    jobs["rabbitmq"]["metrics_path"] = "/metrics/per-object"
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target, rows' nested panels included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.extend(
                (panel.get("title", ""), target["expr"])
                for target in panel.get("targets", [])
                if target.get("expr")
            )
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"])
    return found


def _substitute(expr: str, vhost: str) -> str:
    """Grafana's variables as the dashboard gets them with every worker selected."""
    values = {"__rate_interval": RATE_INTERVAL, "worker": ".*", "vhost": vhost}
    for name, value in sorted(values.items(), key=lambda item: -len(item[0])):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


class Prometheus:
    def __init__(self, address: str) -> None:
        self.base = f"http://{address}"

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        answer = json.loads(_get(url))
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        _required("the prometheus binary is not installed (apt-get install prometheus)")
    assert binary is not None
    return binary


@pytest.mark.timeout(180)
def test_prometheus_scrapes_the_federation_and_every_dashboard_query_has_data(
    scratch: Scratch,
    tmp_path: Path,
    spawn: Spawn,
    rabbitmq_metrics: str,
    prometheus_binary: str,
) -> None:
    aggregator_port, prometheus_port = _free_port(), _free_port()
    worker_ports = [_free_port(), _free_port()]
    local = ["--metrics-host", "127.0.0.1"]
    spawn(
        "aggregator", "aggregator", *local, "--metrics-port", str(aggregator_port),
        "--state-dir", str(tmp_path / "state"), "--output-dir", str(tmp_path / "run"),
        "--max-jobs", "1",
    )  # fmt: skip
    for i, port in enumerate(worker_ports):
        spawn(
            "worker", f"worker-{i}", *local, "--metrics-port", str(port),
            "--worker-id", scratch.worker(f"w{i}"), "--dataset", "digits",
            "--num-partitions", "2", "--partition-index", str(i), "--threads", "1",
            "--slowdown", "2",
        )  # fmt: skip
    config = _prometheus_config(tmp_path, aggregator_port, worker_ports, rabbitmq_metrics)
    if shutil.which("promtool") is not None:
        checked = subprocess.run(
            ["promtool", "check", "config", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    address = f"127.0.0.1:{prometheus_port}"
    with open(tmp_path / "prometheus.log", "wb") as log:
        prometheus = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={address}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _check(Prometheus(address), scratch, tmp_path)
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(30)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait(10)


def _check(prom: Prometheus, scratch: Scratch, tmp_path: Path) -> None:
    t = scratch.topology
    deadline = time.monotonic() + 30
    while not _answers(f"{prom.base}/-/ready"):
        log = (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"Prometheus is not ready:\n{log}"
        time.sleep(0.3)

    # Every target up: the aggregator, both workers (their worker label from the target file
    # or from the relabelling) and RabbitMQ.
    deadline = time.monotonic() + 60
    while True:
        active = prom.api("targets", state="active")["activeTargets"]
        health = {
            (target["labels"]["job"], target["labels"].get("worker", "")): target["health"]
            for target in active
        }
        if len(active) == 4 and set(health.values()) == {"up"}:
            break
        errors = [(target["scrapeUrl"], target["lastError"]) for target in active]
        assert time.monotonic() < deadline, f"targets not all up: {health} {errors}"
        time.sleep(0.5)
    assert set(health) == {
        ("fedq-aggregator", ""),
        ("fedq-worker", "site-a"),
        ("fedq-worker", "127.0.0.1"),
        ("rabbitmq", ""),
    }

    sender = scratch.transport()
    sender.declare()
    sender.publish(t.jobs, JOB_ROUTING_KEY, encode_message(Job("prometheus-1", SPEC)))

    vhost = unquote(urlsplit(scratch.url).path[1:]) or "/"
    queries = _dashboard_queries()
    exprs = {expr for _, expr in queries}
    assert set(NO_DATA_WITHOUT_AN_EVENT) <= exprs, "an exempted query is not in the dashboard"
    pending = {(title, expr) for title, expr in queries if expr not in NO_DATA_WITHOUT_AN_EVENT}
    # Versions must have been produced for a while (the first task takes a few seconds), so
    # that the rates and quantiles have samples in their windows.
    deadline = time.monotonic() + 60
    while True:
        versions = prom.query("max(fedq_aggregator_model_version)")
        if versions and float(versions[0]["value"][1]) >= VERSIONS:
            break
        assert time.monotonic() < deadline, f"fewer than {VERSIONS} versions seen: {versions}"
        time.sleep(0.5)
    accepted = prom.query(f"sum(rate(fedq_aggregator_updates_accepted_total[{RATE_INTERVAL}]))")
    assert accepted and float(accepted[0]["value"][1]) > 0, accepted
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        time.sleep(1.0)
        pending = {
            (title, expr) for title, expr in pending if not prom.query(_substitute(expr, vhost))
        }
    assert not pending, "dashboard queries without data:\n" + "\n".join(
        f"  {title}: {expr}" for title, expr in sorted(pending)
    )

    # The queue panels show this test's queues (RabbitMQ refreshes queue metrics every few
    # seconds), and the job was still running at the end.
    expected = {t.jobs, t.updates, t.dead, t.task_queue("w0"), t.task_queue("w1")}
    deadline = time.monotonic() + 20
    while True:
        consumers = prom.query(f'rabbitmq_queue_consumers{{vhost="{vhost}"}}')
        queues = {r["metric"]["queue"] for r in consumers}
        if expected <= queues or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert expected <= queues, f"missing {sorted(expected - queues)}"
    assert prom.query("fedq_aggregator_job_running == 1")
    sender.close()
