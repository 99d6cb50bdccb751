"""Tests of the systemd units in deploy/systemd: `systemd-analyze verify` accepts them without a
warning, they are notify services with a watchdog, restart on failure and run hardened as fedq,
the worker keeps the GPUs visible, and their environment files hold valid fedq settings.

`systemd-analyze` comes with systemd. Without it the verify tests skip, except under CI=true,
where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from aggregator.settings import AggregatorSettings
from shared.settings import load_settings
from worker.settings import WorkerSettings

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
FEDQ = "/opt/fedq/venv/bin/fedq"
SERVICES = ("fedq-aggregator.service", "fedq-worker@.service")
UNITS = (*SERVICES, "fedq-submit.service", "fedq-submit.timer")

pytestmark = pytest.mark.timeout(60)


def require_systemd_analyze() -> str:
    """systemd-analyze's path; skip without it, or fail under CI=true."""
    path = shutil.which("systemd-analyze")
    if path is None:
        why = "systemd-analyze is not installed (it comes with systemd)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; CI=true needs it", pytrace=False)
        pytest.skip(f"{why} (skipped outside CI; with CI=true this fails)")
    return path


def directives(unit: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (a key may repeat), from a unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: str, section: str, key: str) -> str:
    (value,) = directives(unit)[section][key]
    return value


def env_file(name: str) -> dict[str, str]:
    """KEY=value lines of an environment file."""
    out = {}
    for line in (SYSTEMD / name).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def minutes(timespan: str) -> float:
    """A systemd time span such as 6min, 90, 10min 30s, in minutes."""
    units = {"min": 1.0, "s": 1 / 60, "": 1 / 60, "h": 60.0}
    parts = re.findall(r"(\d+)\s*(min|h|s|)", timespan)
    return sum(int(n) * units[u] for n, u in parts)


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with ExecStart's fedq replaced by a stub, since verify needs the binary."""
    stub = tmp_path / "bin" / "fedq"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text(encoding="utf-8")
        assert FEDQ in text or unit.endswith(".timer"), unit
        (units / unit).write_text(text.replace(FEDQ, str(stub)))
    # An instance of the template, as `systemctl start fedq-worker@site-a` would load it.
    shutil.copy(units / "fedq-worker@.service", units / "fedq-worker@site-a.service")
    return units


@pytest.mark.parametrize(
    "unit", [*UNITS, "fedq-worker@site-a.service"], ids=lambda u: u.replace("@", "_at_")
)
def test_systemd_analyze_verifies_the_unit_without_a_warning(unit_dir: Path, unit: str) -> None:
    result = subprocess.run(
        [require_systemd_analyze(), "verify", "--man=no", str(unit_dir / unit)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    # verify exits 0 on unknown keys and unparsable values, only printing them: any output fails.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_systemd_analyze_flags_an_unknown_key_so_the_verify_test_can_fail(tmp_path: Path) -> None:
    unit = tmp_path / "broken.service"
    unit.write_text("[Service]\nExecStart=/bin/true\nWatchdogSex=60\n")

    result = subprocess.run(
        [require_systemd_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert "WatchdogSex" in result.stderr


@pytest.mark.parametrize("unit", SERVICES)
def test_a_service_is_a_notify_service_with_a_watchdog_that_restarts_on_failure(
    unit: str,
) -> None:
    service = directives(unit)["Service"]

    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] == ["60"]
    assert service["Restart"] == ["on-failure"]
    assert minutes(one(unit, "Service", "RestartSec")) > 0
    # Connecting retries for up to 5 minutes before READY=1: the start timeout must allow it.
    assert minutes(one(unit, "Service", "TimeoutStartSec")) > 5
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("unit", [*SERVICES, "fedq-submit.service"])
def test_a_service_runs_hardened_as_fedq(unit: str) -> None:
    service = directives(unit)["Service"]

    assert service["User"] == ["fedq"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["ProtectHome"] in (["yes"], ["read-only"])
    assert service["PrivateTmp"] == ["yes"]
    if unit in SERVICES:
        assert service["StateDirectory"] == ["fedq"]


def test_the_aggregator_runs_fedq_aggregator_with_its_state_in_the_state_directory() -> None:
    service = directives("fedq-aggregator.service")["Service"]

    assert one("fedq-aggregator.service", "Service", "ExecStart") == f"{FEDQ} aggregator"
    assert "FEDQ_STATE_DIR=/var/lib/fedq" in service["Environment"]
    assert service["EnvironmentFile"] == ["/etc/fedq/aggregator.env"]


def test_the_worker_instance_names_the_site_and_its_environment_file() -> None:
    service = directives("fedq-worker@.service")["Service"]

    assert service["ExecStart"] == [f"{FEDQ} worker"]
    assert "FEDQ_WORKER_ID=%i" in service["Environment"]
    assert service["EnvironmentFile"] == ["/etc/fedq/worker-%i.env"]


def test_the_worker_keeps_the_gpus_visible() -> None:
    service = directives("fedq-worker@.service")["Service"]

    assert service.get("PrivateDevices", ["no"]) == ["no"]
    assert any(rule.startswith("char-nvidia") for rule in service["DeviceAllow"])
    assert all(rule.endswith(" rw") for rule in service["DeviceAllow"])


def test_the_timer_submits_the_job_file_on_a_schedule() -> None:
    timer = directives("fedq-submit.timer")

    assert (SYSTEMD / one("fedq-submit.timer", "Timer", "Unit")).is_file()
    assert timer["Timer"]["OnCalendar"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]
    assert one("fedq-submit.service", "Service", "Type") == "oneshot"
    assert one("fedq-submit.service", "Service", "ExecStart") == f"{FEDQ} submit /etc/fedq/job.toml"


@pytest.mark.parametrize(
    ("unit", "example", "settings_class"),
    [
        ("fedq-aggregator.service", "aggregator.env.example", AggregatorSettings),
        ("fedq-worker@.service", "worker-site-a.env.example", WorkerSettings),
    ],
)
def test_unit_and_example_environments_hold_valid_settings(
    unit: str, example: str, settings_class: type
) -> None:
    from_unit = dict(
        line.split("=", 1) for line in directives(unit)["Service"].get("Environment", [])
    )
    from_file = env_file(example)
    environment = {**from_unit, **from_file}
    if settings_class is WorkerSettings:
        environment["FEDQ_WORKER_ID"] = environment["FEDQ_WORKER_ID"].replace("%i", "site-a")
    fields = {f"FEDQ_{name.upper()}" for name in settings_class.__dataclass_fields__}

    unknown = {k for k in environment if k.startswith("FEDQ_")} - fields - {"FEDQ_LOG_LEVEL"}
    settings = load_settings(settings_class, None, environment, {})

    assert unknown == set()
    assert settings.metrics_port > 0
    assert "FEDQ_WORKER_ID" not in from_file  # it would win over the instance name


def test_the_submit_environment_sets_only_what_fedq_submit_reads() -> None:
    assert set(env_file("submit.env.example")) == {"FEDQ_BROKER", "FEDQ_PREFIX"}
    assert one("fedq-submit.service", "Service", "EnvironmentFile") == "/etc/fedq/submit.env"


def test_the_aggregator_takes_jobs_only_from_the_account_the_submit_timer_logs_in_as() -> None:
    from_unit = dict(
        line.split("=", 1)
        for line in directives("fedq-aggregator.service")["Service"].get("Environment", [])
    )
    environment = {**from_unit, **env_file("aggregator.env.example")}
    settings = load_settings(AggregatorSettings, None, environment, {})
    submitter = urlsplit(env_file("submit.env.example")["FEDQ_BROKER"]).username

    assert settings.require_user_id is True
    assert settings.job_submitters == (submitter,)
    worker = directives("fedq-worker@.service")["Service"]["Environment"]
    assert "FEDQ_STAMP_USER_ID=true" in worker
