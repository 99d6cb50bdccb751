"""Tests of deploy/prometheus: promtool accepts the config and the rules, the alert unit tests
pass, every alert is unit-tested, and every dashboard query parses as PromQL.

promtool comes with Debian's `prometheus` package. Without it these tests skip, except under
CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fedq.json"
# What Grafana puts in place of its variables, for promtool's eyes.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$worker": ".*", "$vhost": "fedq"}

pytestmark = pytest.mark.timeout(60)


def require_promtool() -> str:
    """promtool's path; skip without it, or fail under CI=true."""
    path = shutil.which("promtool")
    if path is None:
        why = "promtool is not installed (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; CI=true needs it", pytrace=False)
        pytest.skip(f"{why} (skipped outside CI; with CI=true this fails)")
    return path


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=30
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_promtool_accepts_the_prometheus_config_its_rule_files_and_target_files() -> None:
    result = promtool("check", "config", "prometheus.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", "alerts.test.yml")

    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_in_which_it_fires() -> None:
    alerts = {
        rule["alert"]
        for group in load_yaml(PROMETHEUS / "alerts.yml")["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    fired = {
        case["alertname"]
        for test in load_yaml(PROMETHEUS / "alerts.test.yml")["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }

    assert alerts - fired == set()
    assert {
        "FedqAggregatorDown",
        "FedqNoNewModel",
        "FedqUpdateRejectionRateHigh",
        "FedqUpdatesBacklogGrowing",
        "FedqWorkerDown",
    } <= alerts


def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    rules = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"panel {panel['title']!r}: unknown variable in {expr!r}"
            rules.append(
                {"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr}
            )
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = promtool("check", "rules", str(rules_file))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_scrape_jobs_cover_the_aggregator_the_workers_and_rabbitmq_per_worker_labelled() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    assert set(jobs) == {"fedq-aggregator", "fedq-worker", "rabbitmq"}
    # The dashboard and the alerts group worker metrics by `worker`; the relabelling makes it.
    relabel = jobs["fedq-worker"]["relabel_configs"]
    assert [rule["target_label"] for rule in relabel] == ["worker"]
    assert config["rule_files"] == ["alerts.yml"]
    rabbit_targets = [
        target
        for entry in load_yaml(PROMETHEUS / "targets" / "rabbitmq.yml")
        for target in entry["targets"]
    ]
    assert rabbit_targets and all(t.endswith(":15692") for t in rabbit_targets)
