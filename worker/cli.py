"""`fedq worker` / `python -m worker`: run one worker service until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields

import torch
from prometheus_client import CollectorRegistry

from broker import MemoryBroker, Topology, connect
from shared.datasets import list_datasets
from shared.errors import FedqError
from shared.logs import add_logging_arguments, configure_logging
from shared.ops import Health, Operations
from shared.references import add_allow_module_argument
from shared.settings import load_settings, masked
from worker.data import load_local_data
from worker.device import select_device
from worker.metrics import WorkerMetrics
from worker.service import WorkerService
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's flags; each overrides the settings file and FEDQ_* variables."""
    parser.add_argument("--config", help="settings TOML file")
    parser.add_argument("--broker", help="amqp://user:pass@host:5672/vhost")
    parser.add_argument("--worker-id", dest="worker_id", help="this site's id")
    parser.add_argument("--prefix", help="topology name prefix (default fedq)")
    parser.add_argument(
        "--data",
        metavar="PATH_OR_SPEC",
        help="local training data: an .npz file (x_train/y_train or x/y arrays), an ImageFolder "
        "directory (one sub-folder per class), torchvision:Name:ROOT (a torchvision data set "
        "already on disk), package.module:function (returns a torch Dataset), or a built-in "
        f"name ({', '.join(list_datasets())})",
    )
    parser.add_argument(
        "--dataset",
        help=f"a built-in data set or data set spec to share out for a simulation "
        f"({', '.join(list_datasets())}; with --partition and --num-partitions)",
    )
    parser.add_argument("--partition", help="iid | dirichlet:ALPHA | shards:K")
    parser.add_argument("--num-partitions", dest="num_partitions", type=int)
    parser.add_argument("--partition-index", dest="partition_index", type=int)
    parser.add_argument(
        "--partition-seed", dest="partition_seed", type=int, help="same on every worker"
    )
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument(
        "--in-memory-max-mb",
        dest="in_memory_max_mb",
        type=float,
        help="data up to this size as tensors goes to the device whole (default 512); "
        "larger data is read from its files in batches",
    )
    parser.add_argument(
        "--loader-workers",
        dest="loader_workers",
        type=int,
        help="processes reading and decoding batches of data too large for memory (default 2)",
    )
    parser.add_argument("--slowdown", type=float, help="stretch training time by this factor")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--metrics-port", dest="metrics_port", type=int, help="0: no /metrics")
    parser.add_argument("--metrics-host", dest="metrics_host", help="default 0.0.0.0")
    parser.add_argument("--chunk-size", dest="chunk_size", type=int)
    add_allow_module_argument(parser, "tasks' module:function models")
    add_logging_arguments(parser, "INFO")


def settings_from(args: argparse.Namespace) -> WorkerSettings:
    """Merge defaults, the settings file, FEDQ_* variables and the flags."""
    overrides = {f.name: getattr(args, f.name, None) for f in fields(WorkerSettings)}
    return load_settings(WorkerSettings, args.config, os.environ, overrides)


def build_worker(
    settings: WorkerSettings,
    memory: MemoryBroker | None = None,
    registry: CollectorRegistry | None = None,
    health: Health | None = None,
) -> WorkerService:
    """Build a worker service from its settings: transport, device, data and metrics."""
    from shared.errors import ConfigError

    if not settings.worker_id:
        raise ConfigError("a worker needs --worker-id (or FEDQ_WORKER_ID)")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = select_device(settings.device)
    data = load_local_data(settings, device)
    metrics = WorkerMetrics(registry if registry is not None else CollectorRegistry())
    topology = Topology(settings.prefix)
    transport = connect(
        settings.broker,
        topology,
        memory=memory,
        chunk_size=settings.chunk_size,
        stamp_user_id=settings.stamp_user_id,
        user=settings.worker_id,
        declare_topology=settings.declare_topology,
    )
    return WorkerService(transport, settings, data, device, metrics, health=health)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run a worker until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="fedq worker", description=__doc__)
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.library_log_level)
    settings = settings_from(args)
    logger.info("settings: %s", masked(settings))
    registry, health = CollectorRegistry(), Health()
    # Up before loading data and connecting: /healthz says "starting" meanwhile.
    with Operations(registry, health, settings):
        service = build_worker(settings, registry=registry, health=health)
        signal.signal(signal.SIGTERM, lambda *_: service.stop())
        signal.signal(signal.SIGINT, lambda *_: service.stop())
        try:
            service.run()
        finally:
            service.transport.close()
    return 0


if __name__ == "__main__":  # `python -m worker.cli` is `python -m worker`
    try:
        sys.exit(worker_main())
    except FedqError as e:
        sys.exit(f"fedq worker: {e}")
