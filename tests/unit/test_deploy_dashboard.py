"""Tests of the Grafana dashboard and provisioning in deploy/grafana: valid dashboard JSON, the
panels the operators need, and PromQL (dashboard and alerts) that names only metrics that exist:
fedq_* ones the services export, rabbitmq_* ones the rabbitmq_prometheus plugin exports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from aggregator.metrics import AggregatorMetrics
from worker.metrics import WorkerMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "fedq.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# Metrics of RabbitMQ's rabbitmq_prometheus plugin (its prometheus_rabbitmq_core_metrics_collector,
# the same names in 3.8 to 4.x) that fedq's queries may use; the queue ones are per queue (labels
# vhost, queue) with prometheus.return_per_object_metrics = true.
RABBITMQ_METRICS = {
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_messages",
    "rabbitmq_queue_consumers",
    "rabbitmq_queue_messages_published_total",
    "rabbitmq_queue_messages_bytes",
    "rabbitmq_connections",
    "rabbitmq_channels",
    "rabbitmq_consumers",
    "rabbitmq_queues",
    "rabbitmq_process_resident_memory_bytes",
    "rabbitmq_disk_space_available_bytes",
}
# Sample names each metric type exposes, from its family name (counters drop no suffix here:
# prometheus_client gives the family name without _total).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
    "summary": ("", "_sum", "_count", "_created"),
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_NAME = re.compile(r"\b(?:fedq|rabbitmq)_[A-Za-z0-9_:]*")


def exported_fedq_names() -> set[str]:
    """Every sample name the aggregator and the worker can expose, labelled ones included."""
    names: set[str] = set()
    for metrics_class in (AggregatorMetrics, WorkerMetrics):
        registry = CollectorRegistry()
        metrics_class(registry)
        for family in registry.collect():
            names.update(sample.name for sample in family.samples)
            # A labelled metric has no sample before its first label value: add its names too.
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """fedq_* and rabbitmq_* names in a PromQL expression, outside string literals."""
    return set(_NAME.findall(_STRING.sub('""', expr)))


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every dashboard target and every alert rule."""
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule.get('alert') or rule.get('record')}", rule["expr"]


def test_metric_names_are_found_outside_string_literals_only() -> None:
    expr = 'sum by (queue) (rabbitmq_queue_messages{queue=~"fedq_x.+"}) / fedq_a_total'

    assert metric_names(expr) == {"rabbitmq_queue_messages", "fedq_a_total"}


def test_exported_names_include_labelled_counters_and_histogram_series() -> None:
    names = exported_fedq_names()

    assert "fedq_aggregator_updates_rejected_total" in names
    assert "fedq_worker_tasks_failed_total" in names
    assert "fedq_aggregator_update_staleness_bucket" in names
    assert "fedq_worker_device_info" in names
    assert "fedq_aggregator_updates_rejected" not in names


def test_the_dashboard_is_grafana_dashboard_json_with_targets_on_every_panel() -> None:
    board = dashboard()

    assert board["uid"] == "fedq-overview"
    assert board["title"]
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["targets"], panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


def test_the_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize(
    ("need", "pattern"),
    [
        ("accuracy over time", r"fedq_aggregator_eval_accuracy_ratio"),
        ("loss over time", r"fedq_aggregator_eval_loss"),
        ("versions per minute", r"delta\(fedq_aggregator_model_version\[5m\]\)"),
        ("accepted updates", r"rate\(fedq_aggregator_updates_accepted_total"),
        ("rejected by reason", r"by \(reason\) \(rate\(fedq_aggregator_updates_rejected_total"),
        ("staleness heatmap", r"by \(le\) \(increase\(fedq_aggregator_update_staleness_bucket"),
        ("staleness quantiles", r"histogram_quantile\(.*fedq_aggregator_update_staleness_bucket"),
        ("per-worker activity", r"by \(worker\) \(rate\(fedq_worker_tasks_completed_total"),
        ("per-worker training time", r"by \(worker, le\).*fedq_worker_training_duration_seconds"),
        (
            "aggregation latency",
            r"histogram_quantile\(.*fedq_aggregator_aggregation_duration_seconds_bucket",
        ),
        ("queue depth", r"by \(queue\) \(rabbitmq_queue_messages_ready"),
        ("unacked messages", r"by \(queue\) \(rabbitmq_queue_messages_unacked"),
    ],
)
def test_the_dashboard_has_a_query_for(need: str, pattern: str) -> None:
    exprs = [target["expr"] for p in dashboard()["panels"] for target in p.get("targets", [])]

    assert any(re.search(pattern, expr) for expr in exprs), f"no panel shows {need}"


def test_the_staleness_heatmap_reads_histogram_buckets_as_they_are() -> None:
    (heatmap,) = [p for p in dashboard()["panels"] if p["type"] == "heatmap"]

    assert heatmap["targets"][0]["format"] == "heatmap"
    assert heatmap["options"]["calculate"] is False


def test_every_fedq_metric_in_dashboard_and_alert_queries_is_one_the_services_export() -> None:
    exported = exported_fedq_names()
    unknown = {
        (where, name)
        for where, expr in queries()
        for name in metric_names(expr)
        if name.startswith("fedq_") and name not in exported
    }

    assert unknown == set()


def test_every_rabbitmq_metric_in_dashboard_and_alert_queries_is_one_the_plugin_exports() -> None:
    unknown = {
        (where, name)
        for where, expr in queries()
        for name in metric_names(expr)
        if name.startswith("rabbitmq_") and name not in RABBITMQ_METRICS
    }

    assert unknown == set()


def test_rabbitmq_exports_per_queue_metrics_for_the_queue_panels() -> None:
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text(encoding="utf-8")
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text(encoding="utf-8")

    assert re.search(r"^prometheus\.return_per_object_metrics\s*=\s*true\s*$", conf, re.M)
    assert "rabbitmq_prometheus" in plugins
    assert "rabbitmq_management" in plugins


def test_grafana_provisions_the_prometheus_data_source_and_the_dashboard_folder() -> None:
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/fedq.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())

    (datasource,) = source["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (dashboards,) = provider["providers"]
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == dashboards["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
