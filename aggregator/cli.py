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
from shared.errors import ConfigError, FedqError
from shared.jobs import JobSpec, load_job_file
from shared.logs import DEFAULT_LIBRARY_LEVEL, add_logging_arguments, configure_logging
from shared.messages import ID_PATTERN, Cancel, Job, Message, encode_message
from shared.ops import Health, Operations
from shared.references import add_allow_module_argument, requested_modules
from shared.settings import load_settings, masked
from shared.shapes import check_job

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
    add_allow_module_argument(parser, "jobs' module:function models and data sets")
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


def _add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        default=os.environ.get("FEDQ_BROKER", "amqp://guest:guest@localhost:5672/"),
        help="amqp://user:pass@host:5672/vhost (default $FEDQ_BROKER)",
    )
    parser.add_argument("--prefix", default=os.environ.get("FEDQ_PREFIX", "fedq"))


def _require_amqp(url: str) -> None:
    # connect() also takes "memory", which only exists inside one `fedq run` process.
    if not url.startswith(("amqp://", "amqps://")):
        raise ConfigError(
            f"--broker takes the amqp:// or amqps:// URL of the broker the aggregator uses, "
            f"not {url!r}"
        )


def submit_main(argv: Sequence[str] | None = None) -> int:
    """Put a job from a TOML file on the job queue and print its id."""
    parser = argparse.ArgumentParser(prog="fedq submit")
    parser.add_argument("job_file", help="job TOML file (see docs/usage.md#job-files)")
    _add_broker_arguments(parser)
    parser.add_argument("--job-id", dest="job_id", help="default: a new unique id")
    parser.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="publish without building the model on the evaluation data here first",
    )
    args = parser.parse_args(argv)
    spec = load_job_file(args.job_file)
    job_id = args.job_id or f"{spec.name}-{uuid.uuid4().hex[:8]}"
    if not ID_PATTERN.match(job_id):
        raise FedqError(f"invalid job id {job_id!r}")
    _require_amqp(args.broker)
    if args.check:
        check_job_here(spec)
    submit_job(args.broker, args.prefix, job_id, spec)
    print(job_id)
    return 0


def check_job_here(spec: JobSpec) -> None:
    """Load the job's data set and build its model on it, on this machine; ConfigError if not.

    The modules the job's own file names are imported here: the submitter asked for them (the
    aggregator imports them only if its allowed_modules has them)."""
    try:
        check_job(spec, allowed_modules=requested_modules(spec.model.name, spec.dataset))
    except ConfigError as e:
        raise ConfigError(
            f"{e}\nNothing was published. A job whose model or data set exists only where the "
            "aggregator runs can be submitted with --no-check."
        ) from e


def submit_job(broker: str, prefix: str, job_id: str, spec: JobSpec) -> None:
    """Publish one job on the job queue (declaring the topology if it is missing)."""
    if not ID_PATTERN.match(job_id):
        raise FedqError(f"invalid job id {job_id!r}")
    publish_to_jobs(broker, prefix, Job(job_id, spec))


def publish_to_jobs(broker: str, prefix: str, message: Message, declare: bool = True) -> None:
    """Publish a job or a cancel to the jobs exchange (declaring the topology first, or not),
    with the broker-validated user_id that attributes it to this account."""
    transport = connect(broker, Topology(prefix), stamp_user_id=True)
    try:
        if declare:
            transport.declare()
        transport.publish(transport.topology.jobs, JOB_ROUTING_KEY, encode_message(message))
    finally:
        transport.close()


def cancel_main(argv: Sequence[str] | None = None) -> int:
    """Ask the aggregator to end a running or queued job (stop reason `cancelled`)."""
    parser = argparse.ArgumentParser(
        prog="fedq cancel",
        description="End a running or queued job: it stops with reason `cancelled`, its run "
        "directory complete. Needs an account that may submit jobs.",
    )
    parser.add_argument("job_id", metavar="JOB", help="the job id `fedq submit` printed")
    _add_broker_arguments(parser)
    args = parser.parse_args(argv)
    if not ID_PATTERN.match(args.job_id):
        raise FedqError(f"invalid job id {args.job_id!r}")
    _require_amqp(args.broker)
    # No declaration: there is nothing to cancel without the topology, and an operator's account
    # may be allowed to write the jobs exchange without being allowed to configure.
    publish_to_jobs(args.broker, args.prefix, Cancel(args.job_id), declare=False)
    print(f"cancel of {args.job_id} sent; `fedq status` shows when the job has ended")
    return 0


COMMANDS = {
    "run": "run a whole federation on this machine",
    "aggregator": "run the aggregator service",
    "worker": "run a worker service",
    "submit": "put a job on the job queue",
    "cancel": "end a running or queued job (reason cancelled)",
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
        if command == "cancel":
            return cancel_main(rest)
        return submit_main(rest)
    except FedqError as e:
        print(f"fedq {command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # `python -m aggregator.cli ...` is `fedq ...`
    sys.exit(main())
