"""The `fedq` command: run a federation, the aggregator or a worker service, submit jobs."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from prometheus_client import CollectorRegistry

from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker import Topology, connect
from broker.topology import JOB_ROUTING_KEY
from shared.errors import FedqError
from shared.jobs import JobSpec, load_job_file
from shared.logs import DEFAULT_LIBRARY_LEVEL, add_logging_arguments, configure_logging
from shared.messages import ID_PATTERN, Job, encode_message
from shared.ops import Health, Operations
from shared.settings import load_settings, masked

logger = logging.getLogger(__name__)


def add_aggregator_arguments(parser: argparse.ArgumentParser) -> None:
    """The aggregator's flags; each overrides the settings file and FEDQ_* variables."""
    parser.add_argument("--config", help="settings TOML file")
    parser.add_argument("--broker", help="amqp://user:pass@host:5672/vhost")
    parser.add_argument("--state-dir", dest="state_dir", help="where job outputs are kept")
    parser.add_argument("--output-dir", dest="output_dir", help="one job's output directory")
    parser.add_argument("--prefix", help="topology name prefix (default fedq)")
    parser.add_argument("--metrics-port", dest="metrics_port", type=int, help="0: no /metrics")
    parser.add_argument("--metrics-host", dest="metrics_host", help="default 0.0.0.0")
    parser.add_argument("--max-jobs", dest="max_jobs", type=int, help="exit after N jobs")
    parser.add_argument("--worker-timeout", dest="worker_timeout_s", type=float)
    parser.add_argument("--chunk-size", dest="chunk_size", type=int)
    add_logging_arguments(parser, "INFO")


def aggregator_settings(args: argparse.Namespace) -> AggregatorSettings:
    """Merge defaults, the settings file, FEDQ_* variables and the flags."""
    overrides = {f.name: getattr(args, f.name, None) for f in fields(AggregatorSettings)}
    return load_settings(AggregatorSettings, args.config, os.environ, overrides)


def aggregator_main(argv: Sequence[str] | None = None) -> int:
    """Run the aggregator service until SIGTERM or SIGINT (or max_jobs jobs)."""
    parser = argparse.ArgumentParser(prog="fedq aggregator")
    add_aggregator_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.library_log_level)
    settings = aggregator_settings(args)
    logger.info("settings: %s", masked(settings))
    registry, health = CollectorRegistry(), Health()
    metrics = AggregatorMetrics(registry)
    # Up before connecting: /healthz says "starting" while the broker is retried.
    services: list[AggregatorService] = []

    def status() -> dict[str, Any]:
        return services[0].status() if services else {"state": "starting"}

    with Operations(registry, health, settings, status=status):
        topology = Topology(settings.prefix)
        transport = connect(
            settings.broker, topology, chunk_size=settings.chunk_size, prefetch=settings.prefetch
        )
        service = AggregatorService(transport, settings, metrics, health=health)
        services.append(service)
        signal.signal(signal.SIGTERM, lambda *_: service.stop())
        signal.signal(signal.SIGINT, lambda *_: service.stop())
        try:
            service.run()
        finally:
            transport.close()
    return 0


def submit_main(argv: Sequence[str] | None = None) -> int:
    """Put a job from a TOML file on the job queue and print its id."""
    parser = argparse.ArgumentParser(prog="fedq submit")
    parser.add_argument("job_file", help="job TOML file (see docs/usage.md#job-files)")
    parser.add_argument(
        "--broker", default=os.environ.get("FEDQ_BROKER", "amqp://guest:guest@localhost:5672/")
    )
    parser.add_argument("--prefix", default=os.environ.get("FEDQ_PREFIX", "fedq"))
    parser.add_argument("--job-id", dest="job_id", help="default: a new unique id")
    args = parser.parse_args(argv)
    spec = load_job_file(args.job_file)
    job_id = args.job_id or f"{spec.name}-{uuid.uuid4().hex[:8]}"
    submit_job(args.broker, args.prefix, job_id, spec)
    print(job_id)
    return 0


def submit_job(broker: str, prefix: str, job_id: str, spec: JobSpec) -> None:
    """Publish one job on the job queue (declaring the topology if it is missing)."""
    if not ID_PATTERN.match(job_id):
        raise FedqError(f"invalid job id {job_id!r}")
    transport = connect(broker, Topology(prefix))
    try:
        transport.declare()
        body = encode_message(Job(job_id, spec))
        transport.publish(transport.topology.jobs, JOB_ROUTING_KEY, body)
    finally:
        transport.close()


COMMANDS = {
    "run": "run a whole federation on this machine",
    "aggregator": "run the aggregator service",
    "worker": "run a worker service",
    "submit": "put a job on the job queue",
    "broker": "least-privilege broker users: add-worker NAME",
    "status": "show the aggregator's job, version, accuracy, workers and backlog",
    "report": "draw a run directory's accuracy and staleness as a PNG",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `fedq COMMAND ...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        lines = [f"  {name:<11} {text}" for name, text in COMMANDS.items()]
        print("usage: fedq COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if args and args[0] in ("-h", "--help") else 2
    command, rest = args[0], args[1:]
    try:
        # The one-shot commands log only what goes wrong; the services set their own levels.
        configure_logging(
            os.environ.get("FEDQ_LOG_LEVEL", "WARNING"),
            os.environ.get("FEDQ_LIBRARY_LOG_LEVEL", DEFAULT_LIBRARY_LEVEL),
        )
        if command == "broker":
            from broker.admin import broker_main

            return broker_main(rest)
        if command == "run":
            from aggregator.federation import run_main

            return run_main(rest)
        if command == "aggregator":
            return aggregator_main(rest)
        if command == "worker":
            # The command line is the one place allowed to reach both services.
            from worker.cli import worker_main

            return worker_main(rest)
        if command == "status":
            from aggregator.status import status_main

            return status_main(rest)
        if command == "report":
            from aggregator.report import report_main

            return report_main(rest)
        return submit_main(rest)
    except FedqError as e:
        print(f"fedq {command}: {e}", file=sys.stderr)
        return 1
