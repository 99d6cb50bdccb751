"""`fedq run`: a whole federation on one machine, in one process or as separate processes.

This launcher is the one module allowed to import both the aggregator and the worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from aggregator.cli import submit_job
from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from broker import MemoryBroker, MemoryTransport, Topology, connect
from broker.rabbitmq import masked_url
from shared.datasets import list_datasets, load_dataset
from shared.errors import ConfigError, FedqError
from shared.jobs import (
    JobSpec,
    ModelSpec,
    StopConfig,
    StrategyConfig,
    TrainingConfig,
    load_job_file,
)
from shared.logs import add_logging_arguments, configure_logging
from shared.references import requested_modules
from shared.shapes import check_model_takes_data, complete_model

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags of `fedq run`."""
    p = argparse.ArgumentParser(prog="fedq run", description="Run a federation on this machine.")
    p.add_argument("--job", help="job TOML file; the flags below override it")
    p.add_argument("--name", help="job name, the start of the job id (default: the job's, or demo)")
    p.add_argument("--workers", type=int, help="default: one per --data file, else 4")
    p.add_argument("--strategy", choices=["fedavg", "fedbuff", "fedasync"])
    p.add_argument("--model", help="fednet | cnn | mlp | torchvision:NAME | module:function")
    p.add_argument("--dataset", help="mnist5k | digits | a data set spec")
    p.add_argument("--partition", help="iid (default) | dirichlet:ALPHA | shards:K")
    p.add_argument(
        "--data",
        action="append",
        metavar="FILE,FILE,...",
        help="each worker's own data (.npz, ImageFolder dir or data set spec), one per worker, "
        "comma-separated or repeated; instead of a share of --dataset",
    )
    p.add_argument("--target-accuracy", type=float)
    p.add_argument("--max-time", type=float, help="seconds")
    p.add_argument("--max-versions", type=int)
    p.add_argument("--slowdown", help="per-worker factors, e.g. 1,1,1,5")
    p.add_argument("--broker", default="memory", help="memory | amqp://...")
    p.add_argument("--out", help="run directory (default runs/<job id>)")
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adam"])
    p.add_argument("--mu", type=float, help="FedProx proximal term")
    p.add_argument("--buffer-size", type=int, help="FedBuff K")
    p.add_argument("--server-lr", type=float, help="FedBuff server learning rate")
    p.add_argument("--alpha", type=float, help="FedAsync mixing weight")
    p.add_argument("--staleness", choices=["constant", "polynomial", "hinge"])
    p.add_argument("--max-staleness", type=int)
    p.add_argument(
        "--max-update-norm-ratio", type=float, help="reject updates this many times the median norm"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: auto)")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    add_logging_arguments(p, "WARNING")
    args = p.parse_args(argv)
    args.sites = site_data(args.data)
    args.workers = worker_count(args.workers, args.sites)
    if args.sites and args.partition is not None:
        raise ConfigError(
            "--partition divides --dataset among the workers; with --data each worker "
            "trains on its own file: give one or the other"
        )
    args.partition = args.partition or "iid"
    return args


def check_sites(model: ModelSpec, sites: list[str]) -> None:
    """Refuse, before anything starts, a site's data that the model cannot take: every file is
    on this machine, so a worker would only find out at its first task and leave the job."""
    from worker.data import data_spec

    for index, site in enumerate(sites):
        spec = data_spec(site)
        allowed = requested_modules(model.name, spec)
        try:
            data = load_dataset(spec, "train", allowed_modules=allowed)
            check_model_takes_data(model, data, allowed_modules=allowed)
        except FedqError as e:
            raise ConfigError(f"--data {site} (worker w{index}): {e}") from e


def site_data(values: list[str] | None) -> list[str]:
    """The per-worker data of --data (comma-separated, repeatable); files must exist."""
    sites = [item.strip() for value in values or [] for item in value.split(",")]
    if any(not site for site in sites):
        raise ConfigError(f"--data has an empty entry: {','.join(values or [])!r}")
    for site in sites:
        # A data set spec (npz:PATH, torchvision:..., module:function, a built-in name) is
        # passed on as it is; anything else names a file or directory, which must be there.
        if not os.path.exists(site) and ":" not in site and site not in list_datasets():
            raise ConfigError(f"--data {site}: no such file or directory")
    return [os.path.abspath(site) if os.path.exists(site) else site for site in sites]


def worker_count(workers: int | None, sites: list[str]) -> int:
    """--workers, which defaults to the number of --data entries (else 4) and must match it."""
    if workers is None:
        return len(sites) or 4
    if workers < 1:
        raise ConfigError("--workers must be >= 1")
    if sites and workers != len(sites):
        raise ConfigError(
            f"--workers {workers} but {len(sites)} --data entries: give one data file per "
            "worker (or leave --workers out)"
        )
    return workers


def job_spec(args: argparse.Namespace) -> JobSpec:
    """The job: a job file if given, the demo defaults otherwise, then the flags on top."""
    spec = (
        load_job_file(args.job)
        if args.job
        else JobSpec(
            name="demo", stop=StopConfig(max_versions=100, target_accuracy=0.95, max_time_s=600)
        )
    )
    if args.name is not None:
        spec = replace(spec, name=args.name)  # validated again: the name starts the job id
    dataset = args.dataset or spec.dataset
    model_name = args.model or spec.model.name
    # The modules the user named (--model, --dataset, the job file) are imported here and by
    # the services this command starts (allowed_modules): the user asked for them.
    allowed = requested_modules(model_name, dataset)
    # The job's input shape and classes, else the data's (shared.shapes, as submit and the
    # aggregator do); checked on the data here, with the registry's message, not in a service.
    data = load_dataset(dataset, "test", allowed_modules=allowed)
    model = complete_model(replace(spec.model, name=model_name), data)
    check_model_takes_data(model, data, allowed_modules=allowed)
    check_sites(model, args.sites)
    strategy = _with(
        spec.strategy,
        StrategyConfig,
        # Start the clock once every worker has loaded its data, as a centralised run would.
        min_workers=args.workers,
        name=args.strategy,
        buffer_size=args.buffer_size,
        server_lr=args.server_lr,
        alpha=args.alpha,
        staleness=args.staleness,
        max_staleness=args.max_staleness,
        max_update_norm_ratio=args.max_update_norm_ratio,
    )
    training = _with(
        spec.training,
        TrainingConfig,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        mu=args.mu,
    )
    stop = _with(
        spec.stop,
        StopConfig,
        target_accuracy=args.target_accuracy,
        max_time_s=args.max_time,
        max_versions=args.max_versions,
    )
    seed = spec.seed if args.seed is None else args.seed
    return replace(
        spec,
        dataset=dataset,
        model=model,
        strategy=strategy,
        training=training,
        stop=stop,
        seed=seed,
    )


def _with(config: Any, cls: type, **changes: Any) -> Any:
    """A copy of a frozen config with the non-None changes applied (validated again)."""
    values = {k: v for k, v in changes.items() if v is not None}
    return cls(**{**config.__dict__, **values})


def slowdowns(text: str | None, workers: int) -> list[float]:
    """Per-worker slowdown factors; missing ones are 1."""
    if not text:
        return [1.0] * workers
    try:
        factors = [float(f) for f in text.split(",")]
    except ValueError as e:
        raise ConfigError(f"--slowdown must be comma-separated numbers: {text!r}") from e
    if len(factors) > workers or not all(math.isfinite(f) and f >= 1 for f in factors):
        raise ConfigError("--slowdown needs at most one factor >= 1 per worker")
    return factors + [1.0] * (workers - len(factors))


def run_main(argv: Sequence[str] | None = None) -> int:
    """Run a federation, show live progress, print the summary; exit 0 when it completed."""
    args = parse_args(argv)
    configure_logging(args.log_level, args.library_log_level)
    spec = job_spec(args)
    factors = slowdowns(args.slowdown, args.workers)
    job_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
    out = Path(args.out or f"runs/{job_id}")
    if (out / "history.jsonl").exists():
        raise ConfigError(f"{out} already holds a run; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    data = (
        f"{len(args.sites)} site data files, evaluated on {spec.dataset}"
        if args.sites
        else f"{spec.dataset} {args.partition}"
    )
    print(
        f"fedq run: job {job_id}, {args.workers} workers, {spec.strategy.name}, "
        f"model {spec.model.name}, {data}, broker {masked_url(args.broker)}"
    )
    print(f"  run directory: {out}")
    progress = Progress(out / "history.jsonl", quiet=args.quiet)
    if args.broker == "memory":
        run_embedded(spec, job_id, args, factors, out, progress)
    else:
        run_processes(spec, job_id, args, factors, out, progress)
    if not (out / "summary.json").exists():
        raise ConfigError(f"the job did not run to completion; see the logs under {out}")
    summary = json.loads((out / "summary.json").read_text())
    print_summary(summary)
    return 0


def worker_threads(args: argparse.Namespace, processes: int) -> int:
    """Torch threads per worker: the cores shared out, at least one."""
    return args.threads or max(1, (os.cpu_count() or 1) // processes)


def run_embedded(
    spec: JobSpec,
    job_id: str,
    args: argparse.Namespace,
    factors: list[float],
    out: Path,
    progress: Progress,
) -> None:
    """Aggregator and workers as threads of this process over the in-process broker."""
    from worker.cli import build_worker
    from worker.settings import WorkerSettings

    # One process: torch's thread pool is shared by every worker thread.
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, args.threads or os.cpu_count() or 1)))
    memory = MemoryBroker()
    topology = Topology("fedq")
    allowed = requested_modules(spec.model.name, spec.dataset)
    settings = AggregatorSettings(
        broker="memory",
        output_dir=str(out),
        max_jobs=1,
        state_dir=str(out / "state"),
        allowed_modules=allowed,
    )
    agg_transport = MemoryTransport(memory, topology)
    aggregator = AggregatorService(agg_transport, settings, AggregatorMetrics(CollectorRegistry()))
    agg_transport.declare()
    workers = []
    for index in range(args.workers):
        ws = WorkerSettings(
            worker_id=f"w{index}",
            broker="memory",
            **_local_data(spec, args, index),
            slowdown=factors[index],
            seed=spec.seed + index,
            device="cpu",
            hello_interval_s=2.0,
            allowed_modules=allowed,
        )
        workers.append(build_worker(ws, memory=memory))
    threads = [threading.Thread(target=w.run, name=w.worker_id, daemon=True) for w in workers]
    for t in threads:
        t.start()
    agg_transport.publish(topology.jobs, "job", _job_body(job_id, spec))
    agg_thread = threading.Thread(target=aggregator.run, name="aggregator", daemon=True)
    agg_thread.start()
    while agg_thread.is_alive():
        agg_thread.join(0.5)
        progress.poll()
    progress.poll()
    for w in workers:
        w.stop()
    for t in threads:
        t.join(60)


def _local_data(spec: JobSpec, args: argparse.Namespace, index: int) -> dict[str, Any]:
    """Worker `index`'s data settings: its own --data entry, or its share of the data set."""
    if args.sites:
        return {"data": args.sites[index]}
    return {
        "dataset": spec.dataset,
        "partition": args.partition,
        "num_partitions": args.workers,
        "partition_index": index,
        "partition_seed": spec.seed,
    }


def _job_body(job_id: str, spec: JobSpec) -> bytes:
    from shared.messages import Job, encode_message

    return encode_message(Job(job_id, spec))


def run_processes(
    spec: JobSpec,
    job_id: str,
    args: argparse.Namespace,
    factors: list[float],
    out: Path,
    progress: Progress,
) -> None:
    """The aggregator and each worker as separate processes over RabbitMQ."""
    prefix = f"fedq-run-{uuid.uuid4().hex[:6]}"
    threads = worker_threads(args, args.workers)
    # The broker URL goes in FEDQ_BROKER (see _spawn), not on command lines that `ps` shows.
    common = ["--prefix", prefix, "--log-level", args.log_level]
    common += ["--library-log-level", args.library_log_level]
    for module in requested_modules(spec.model.name, spec.dataset):
        common += ["--allow-module", module]
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    aggregator = _spawn(
        "aggregator",
        [*common, "--state-dir", str(out / "state"), "--output-dir", str(out), "--max-jobs", "1"],
        logs / "aggregator.log",
        args.broker,
    )
    workers = []
    for i in range(args.workers):
        argv = [*common, "--worker-id", f"w{i}", "--slowdown", str(factors[i])]
        for name, value in _local_data(spec, args, i).items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        argv += ["--seed", str(spec.seed + i)]
        argv += ["--threads", str(threads)]
        workers.append(_spawn("worker", argv, logs / f"worker-w{i}.log", args.broker))
    try:
        submit_job(args.broker, prefix, job_id, spec)
        while aggregator.poll() is None:
            time.sleep(0.5)
            progress.poll()
            dead = [w for w in workers if w.poll() is not None]
            if len(dead) == len(workers):
                raise ConfigError(f"every worker exited; see {logs}")
        progress.poll()
        if aggregator.returncode != 0:
            raise ConfigError(f"the aggregator failed (exit {aggregator.returncode}); see {logs}")
    finally:
        for proc in [*workers, aggregator]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*workers, aggregator]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        # The run's prefix is its own: nothing else will ever read these queues.
        transport = connect(args.broker, Topology(prefix))
        try:
            transport.teardown([f"w{i}" for i in range(args.workers)])
        finally:
            transport.close()


def _spawn(service: str, argv: list[str], log: Path, broker: str) -> subprocess.Popen[bytes]:
    """Start `python -m service`; the broker URL, password and all, travels in its environment."""
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", service, *argv],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=os.environ | {"FEDQ_BROKER": broker},
        )


class Progress:
    """Prints one line per new model version by following history.jsonl."""

    def __init__(self, path: Path, quiet: bool) -> None:
        self.path = path
        self.quiet = quiet
        self._offset = 0

    def poll(self) -> None:
        """Print the versions written since the last poll."""
        if self.quiet or not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as fh:
            fh.seek(self._offset)
            for line in fh:
                if not line.endswith("\n"):
                    break
                self._offset += len(line.encode())
                self._show(json.loads(line))

    @staticmethod
    def _show(r: dict[str, Any]) -> None:
        acc = "   n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:5.2f}%"
        rate = r["updates_accepted"] / r["time_s"] if r["time_s"] > 0 else 0.0
        print(
            f"  v{r['version']:<4} t={r['time_s']:7.1f}s  accuracy {acc}  "
            f"updates {r['updates']:>2}  {rate:5.2f} upd/s  staleness {r['mean_staleness']:.2f}",
            flush=True,
        )


def print_summary(s: dict[str, Any]) -> None:
    """The run's outcome in a few lines."""
    target = s.get("target_accuracy")
    reached = "n/a"
    if target is not None:
        reached = f"{s['time_to_target_s']:.1f}s" if s["reached_target"] else "not reached"
    best = (s.get("models") or {}).get("best")
    best_at = f" at v{best['version']}" if best else ""
    print(
        f"summary: {s['stop_reason']} after {s['wall_time_s']:.1f}s, {s['versions']} versions, "
        f"final accuracy {100 * (s['final_accuracy'] or 0):.2f}% "
        f"(best {100 * s['best_accuracy']:.2f}%{best_at}), time to {target}: {reached}, "
        f"updates accepted {s['updates_accepted']}, rejected {s['updates_rejected']}"
    )
