"""Logging: fedq's own lines tell the story; other libraries' stay at WARNING unless asked; an
unreachable broker is one readable line per attempt, never a traceback.

No broker is reached: connections go to a closed local port.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aggregator.cli import main
from broker import Topology
from broker.rabbitmq import RabbitMQTransport, ReconnectPolicy, connect_failure
from shared.errors import ConfigError, ConnectionLostError
from shared.logs import configure_logging, log_level

ROOT = Path(__file__).resolve().parents[2]
CLOSED_PORT = "amqp://guest:s3cret@127.0.0.1:1/"
FAST_GIVE_UP = ReconnectPolicy(base_s=0.01, cap_s=0.02, give_up_s=0.3)


def _python(script: str) -> subprocess.CompletedProcess[str]:
    """Run a script in a fresh interpreter (its own logging set-up) and return its output."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    env.pop("FEDQ_LOG_LEVEL", None)
    env.pop("FEDQ_LIBRARY_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_at_the_default_level_fedq_s_info_lines_show_and_pika_s_and_urllib3_s_do_not() -> None:
    result = _python(
        """
        import logging
        from shared.logs import configure_logging
        configure_logging("INFO")
        configure_logging("INFO")  # a second call adds no second handler
        logging.getLogger("pika.adapters.blocking_connection").info("pika says hello")
        logging.getLogger("urllib3.connectionpool").info("urllib3 says hello")
        logging.getLogger("urllib3.connectionpool").warning("urllib3 warns")
        logging.getLogger("worker.service").info("fedq says hello")
        """
    )

    lines = result.stderr.splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "urllib3.connectionpool WARNING urllib3 warns",
        "worker.service INFO fedq says hello",
    ]


def test_other_libraries_lines_show_when_their_level_is_asked_for() -> None:
    result = _python(
        """
        import logging
        from shared.logs import configure_logging
        configure_logging("WARNING", "info")
        logging.getLogger("pika.channel").info("pika says hello")
        logging.getLogger("aggregator.service").info("fedq says hello")
        """
    )

    assert "pika.channel INFO pika says hello" in result.stderr
    assert "fedq says hello" not in result.stderr


@pytest.mark.parametrize("level", ["LOUD", "", "info2"])
def test_an_unknown_log_level_is_a_config_error(level: str) -> None:
    with pytest.raises(ConfigError, match="--log-level must be one of DEBUG, INFO"):
        configure_logging(level)


def test_level_names_are_taken_in_any_case() -> None:
    assert (log_level("debug"), log_level(" Warning ")) == (logging.DEBUG, logging.WARNING)


def test_a_service_with_an_unknown_log_level_returns_1_with_the_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(["worker", "--worker-id", "w0", "--dataset", "digits", "--log-level", "LOUD"])

    assert status == 1
    assert "fedq worker: --log-level must be one of" in capsys.readouterr().err


def test_a_refused_connection_is_one_fedq_line_per_attempt_without_pika_s_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    with pytest.raises(ConnectionLostError, match=r"attempts\): connection refused"):
        RabbitMQTransport(CLOSED_PORT, Topology("t"), reconnect=FAST_GIVE_UP)

    pika_failures = [
        r for r in caplog.records if r.name.startswith("pika") and r.levelno >= logging.WARNING
    ]
    assert pika_failures == []
    assert all(r.exc_info is None for r in caplog.records)
    ours = [r.getMessage() for r in caplog.records if r.name == "broker.rabbitmq"]
    assert len(ours) >= 2
    for n, message in enumerate(ours[:-1], start=1):
        assert re.fullmatch(
            rf"cannot connect to RabbitMQ at amqp://guest:\*\*\*@127\.0\.0\.1:1/ \(attempt {n}\): "
            r"connection refused; next attempt in \d+\.\d s",
            message,
        )
    assert ours[-1].endswith(f"(attempt {len(ours)}): connection refused; giving up")


def test_pika_s_own_account_of_a_refused_connection_shows_when_pika_is_asked_for_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="pika")

    with pytest.raises(ConnectionLostError):
        RabbitMQTransport(CLOSED_PORT, Topology("t"), reconnect=FAST_GIVE_UP)

    assert any(r.name.startswith("pika") for r in caplog.records)


def test_an_unreachable_broker_prints_no_traceback_and_no_password_on_stderr() -> None:
    result = _python(
        f"""
        from broker import Topology
        from broker.rabbitmq import RabbitMQTransport, ReconnectPolicy
        from shared.errors import ConnectionLostError
        from shared.logs import configure_logging
        configure_logging("INFO")
        try:
            RabbitMQTransport({CLOSED_PORT!r}, Topology("t"),
                              reconnect=ReconnectPolicy(base_s=0.01, cap_s=0.02, give_up_s=0.3))
        except ConnectionLostError:
            pass
        """
    )

    lines = result.stderr.splitlines()
    assert result.returncode == 0
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr
    assert len(lines) >= 2
    assert all(
        " broker.rabbitmq " in line and "cannot connect to RabbitMQ" in line for line in lines
    )


def test_the_cause_of_a_failed_connection_is_dug_out_of_pika_s_nested_errors() -> None:
    import pika.exceptions
    from pika.adapters.utils.connection_workflow import (
        AMQPConnectionWorkflowFailed,
        AMQPConnectorSocketConnectError,
    )

    refused = ConnectionRefusedError(111, "Connection refused")
    nested = pika.exceptions.AMQPConnectionError(
        AMQPConnectionWorkflowFailed([AMQPConnectorSocketConnectError(refused)])
    )

    assert connect_failure(nested) == "connection refused"
    assert connect_failure(pika.exceptions.AMQPConnectionError()) == "AMQPConnectionError"
