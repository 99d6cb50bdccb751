"""Load: many lightweight workers against the real aggregator through RabbitMQ, fully accounted.

    .venv/bin/python bench/load.py --workers 50 --seconds 60 [--strategy fedbuff|fedasync]
        [--broker amqp://guest:guest@localhost:5672/] [--think-ms 50,200] [--procs 2]
        [--model mlp|cnn]

The aggregator is the real service (`python -m aggregator`, its own process) on a job with a
small model (--model mlp: the 2NN on 8x8 digits, 55,210 parameters) or the FedAvg CNN
(--model cnn: on mnist5k, 1.66M parameters, 6.7 MB an update). The workers do not train: each is a
thread with its own RabbitMQTransport that says hello, takes tasks and answers each one, after a
think time, with an update of the right kind (small random deltas, or the task's weights plus
noise). They stop publishing after --seconds; the job stops at the same wall-clock limit.

Independently of the aggregator, a tap (a classic queue bound to the updates exchange) records
every update the broker routed. Every second the updates queue depth, the aggregator's lag (updates
routed minus updates it has received, from its metrics) and its RSS are sampled. At the end every
update is accounted for from the run directory and the dead queue: folded into exactly one version,
or rejected with a reason; anything else is lost. Exits 1 if an update was lost or counted twice.
Everything runs under a fresh topology prefix (fedq-load-<hex>) that is deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pika

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.rabbitmq import RabbitMQTransport
from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY, Topology, read_dead_letter
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig
from shared.messages import Hello, Job, Task, Update, decode_message, encode_message

DEFAULT_BROKER = os.environ.get("FEDQ_BENCH_BROKER", "amqp://guest:guest@localhost:5672/")
HELLO_INTERVAL_S = 5.0
NOISE_POOL = 4
# The job's model and evaluation data, by --model.
MODELS = {
    "mlp": (ModelSpec("mlp", (1, 8, 8), 10), "digits"),
    "cnn": (ModelSpec("cnn", (1, 28, 28), 10), "mnist5k"),
}
# One noise pool per process, shared by its worker threads: per worker, a pool of the CNN
# would take 27 MB, 2.7 GB for 100 workers, and the machine is the harness's, not the bench's.
_noise: list[dict[str, np.ndarray]] = []
_noise_lock = threading.Lock()


def noise_pool(tensors: dict[str, np.ndarray], rng: np.random.Generator) -> list[dict[str, Any]]:
    """This process's NOISE_POOL sets of small random tensors shaped like `tensors`."""
    with _noise_lock:
        if not _noise:
            _noise.extend(
                {
                    name: (rng.standard_normal(a.shape) * 0.01).astype(a.dtype)
                    for name, a in tensors.items()
                }
                for _ in range(NOISE_POOL)
            )
        return _noise


# ---------------------------------------------------------------- lightweight workers


@dataclass
class WorkerResult:
    """What one lightweight worker did: the update ids it saw confirmed, and its troubles."""

    worker_id: str
    published: list[str] = field(default_factory=list)
    tasks: int = 0
    superseded: int = 0
    dropped_at_deadline: int = 0
    publish_failures: int = 0
    error: str | None = None


class LoadWorker:
    """A worker that answers tasks without training: one thread, one connection."""

    def __init__(self, worker_id: str, config: dict[str, Any], stop_at: Any) -> None:
        self.worker_id = worker_id
        self.config = config
        self.stop_at = stop_at  # a shared double: 0 until the load window is set
        self.result = WorkerResult(worker_id)
        self.rng = np.random.default_rng(zlib.crc32(worker_id.encode()))
        self.task: Task | None = None
        self.due = 0.0
        self.last_hello = 0.0

    def run(self, ready: Any) -> None:
        """Say hello, then answer tasks until the deadline; errors end this worker only."""
        transport = None
        try:
            topology = Topology(self.config["prefix"])
            transport = RabbitMQTransport(
                self.config["broker"], topology, connection_name=f"fedq-load {self.worker_id}"
            )
            transport.declare_worker(self.worker_id)
            transport.subscribe(topology.task_queue(self.worker_id))
            self._hello(transport)
            with ready.get_lock():
                ready.value += 1
            self._loop(transport)
        except Exception as e:  # the harness reports it; one worker must not stop the others
            self.result.error = f"{type(e).__name__}: {e}"
        finally:
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.close()

    def _deadline_passed(self) -> bool:
        stop_at = self.stop_at.value
        return bool(stop_at) and time.time() >= stop_at

    def _loop(self, transport: RabbitMQTransport) -> None:
        while not self._deadline_passed():
            now = time.monotonic()
            wait = max(0.0, self.due - now) if self.task is not None else 0.5
            delivery = transport.receive(min(wait, 0.5))
            while delivery is not None:
                self._take(transport, delivery)
                delivery = transport.receive(0)
            now = time.monotonic()
            if self.task is not None and now >= self.due:
                task, self.task = self.task, None
                if self._deadline_passed():
                    self.result.dropped_at_deadline += 1
                    break
                self._answer(transport, task)
            elif self.task is None and now - self.last_hello >= HELLO_INTERVAL_S:
                self._hello(transport)

    def _take(self, transport: RabbitMQTransport, delivery: Any) -> None:
        message = decode_message(delivery.body)
        transport.ack(delivery)
        if not isinstance(message, Task):
            return
        self.result.tasks += 1
        if self.task is None:
            low, high = self.config["think_ms"]
            self.due = time.monotonic() + float(self.rng.uniform(low, high)) / 1000.0
        else:
            self.result.superseded += 1
            if (self.task.version, self.task.issued_at) > (message.version, message.issued_at):
                return
        self.task = message

    def _tensors(self, task: Task) -> dict[str, np.ndarray]:
        pool = noise_pool(task.model.tensors, self.rng)
        noise = pool[int(self.rng.integers(NOISE_POOL))]
        if task.training.send == "delta":
            return noise
        return {name: a + noise[name] for name, a in task.model.tensors.items()}

    def _answer(self, transport: RabbitMQTransport, task: Task) -> None:
        update = Update(
            job_id=task.job_id,
            update_id=uuid.uuid4().hex,
            worker_id=self.worker_id,
            task_id=task.task_id,
            base_version=task.version,
            round=task.round,
            kind=task.training.send,
            num_samples=self.config["num_samples"],
            tensors=self._tensors(task),
            metrics={"loss": float(self.rng.uniform(0.1, 2.0))},
        )
        try:
            transport.publish(
                transport.topology.updates, UPDATE_ROUTING_KEY, encode_message(update)
            )
        except Exception:
            # The tap still shows whether the broker routed it.
            self.result.publish_failures += 1
            raise
        self.result.published.append(update.update_id)
        self.last_hello = time.monotonic()

    def _hello(self, transport: RabbitMQTransport) -> None:
        hello = Hello(self.worker_id, self.config["num_samples"], "load")
        transport.publish(transport.topology.updates, UPDATE_ROUTING_KEY, encode_message(hello))
        self.last_hello = time.monotonic()


def worker_group(
    worker_ids: list[str], config: dict[str, Any], stop_at: Any, ready: Any, results: Any
) -> None:
    """One process of lightweight workers, one thread each; puts their results on `results`."""
    workers = [LoadWorker(w, config, stop_at) for w in worker_ids]
    threads = [threading.Thread(target=w.run, args=(ready,), name=w.worker_id) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put([asdict(w.result) for w in workers])


# ---------------------------------------------------------------- observers


class Tap:
    """A classic queue bound to the updates exchange: every update the broker routed, counted."""

    def __init__(self, broker: str, topology: Topology) -> None:
        self.params = pika.URLParameters(broker)
        self.topology = topology
        self.queue = f"{topology.prefix}.load-tap"
        self.ids: list[str] = []
        self.hellos = 0
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tap", daemon=True)
        self.error: str | None = None

    def start(self) -> None:
        """Declare and bind the tap queue on the tap's own connection, then consume it."""
        self._thread.start()
        if not self.ready.wait(30):
            raise SystemExit(f"the tap did not start: {self.error}")

    def _run(self) -> None:
        try:
            connection = pika.BlockingConnection(self.params)
            channel = connection.channel()
            # Auto-delete: the broker drops it with its consumer, whatever happens to us.
            channel.queue_declare(self.queue, auto_delete=True)
            channel.queue_bind(self.queue, self.topology.updates, routing_key=UPDATE_ROUTING_KEY)
            channel.basic_qos(prefetch_count=500)
            channel.basic_consume(self.queue, self._on_message, auto_ack=True)
            self.ready.set()
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.2)
            connection.close()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            self.ready.set()

    def _on_message(self, _channel: Any, _method: Any, _properties: Any, body: bytes) -> None:
        message = msgpack.unpackb(body, raw=False)
        if message.get("type") == "update":
            self.ids.append(message["update_id"])
        elif message.get("type") == "hello":
            self.hellos += 1

    def stop(self) -> None:
        """Stop consuming (the auto-delete queue goes with the consumer)."""
        self._stop.set()
        self._thread.join(10)


class Probe:
    """Reads queue depths on its own plain pika channel (main thread only)."""

    def __init__(self, broker: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(broker))
        self.channel = self.connection.channel()

    def depth(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of a queue; unacked ones are not in the count."""
        frame = self.channel.queue_declare(queue, passive=True)
        return int(frame.method.message_count), int(frame.method.consumer_count)

    def close(self) -> None:
        """Close the probe's connection."""
        with contextlib.suppress(Exception):
            self.connection.close()


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    """A process's resident set (VmRSS) or its peak (VmHWM) in KiB, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pids() -> list[int]:
    """The local RabbitMQ node's Erlang VM (beam.smp), if it runs on this machine."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip().startswith("beam"):
                    pids.append(int(entry.name))
    return pids


class CpuMeter:
    """CPU seconds used by named groups of processes between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {name: sum(map(cpu_seconds, pids)) for name, pids in self.groups.items()}

    def start(self) -> None:
        """Take the starting readings."""
        self._start, self._t = self._now(), time.monotonic()

    def stop(self) -> None:
        """Take the readings at the end: `used` holds cores busy, on average, per group."""
        end, elapsed = self._now(), time.monotonic() - self._t
        self.used = {name: (end[name] - self._start[name]) / elapsed for name in end}


def scrape(port: int) -> dict[str, float]:
    """The aggregator's counters that matter here, from its Prometheus endpoint."""
    wanted = (
        "fedq_aggregator_updates_received_total",
        "fedq_aggregator_updates_accepted_total",
        "fedq_aggregator_model_version",
        "fedq_aggregator_job_running",
    )
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name] = float(value)
    return out


@dataclass
class Sample:
    """One second of observation."""

    t: float
    ready: int
    lag: int
    rss_kib: int
    received: int
    version: int
    scraped: bool  # whether the aggregator's metrics answered (lag is meaningless if not)


@dataclass
class Samples:
    """Everything the sampler saw, in order."""

    rows: list[Sample] = field(default_factory=list)

    def take(self, t0: float, probe: Probe, queue: str, tap: Tap, pid: int, port: int) -> Sample:
        """Sample the updates queue depth, the aggregator's lag and its RSS now."""
        ready, _ = probe.depth(queue)
        figures = scrape(port)
        received = int(figures.get("fedq_aggregator_updates_received_total", 0))
        row = Sample(
            round(time.monotonic() - t0, 2),
            ready,
            len(tap.ids) - received,
            rss_kib(pid),
            received,
            int(figures.get("fedq_aggregator_model_version", 0)),
            bool(figures),
        )
        self.rows.append(row)
        return row

    @staticmethod
    def rate(rows: list[Sample], start: float, end: float) -> float:
        """Updates the aggregator received per second between two fractions of `rows`."""
        a, b = int(start * (len(rows) - 1)), int(end * (len(rows) - 1))
        if b <= a:
            return 0.0
        return (rows[b].received - rows[a].received) / (rows[b].t - rows[a].t)


# ---------------------------------------------------------------- accounting


@dataclass
class Accounts:
    """Where every update went."""

    published: set[str]
    routed: set[str]
    folded: Counter[str]
    rejected: dict[str, str]
    late: set[str]  # dead-lettered as job_finished: they came after the job ended
    dead_other: Counter[str]
    versions: int
    double_published: int

    @property
    def sent(self) -> set[str]:
        """Updates that left a worker: confirmed to it, or seen routed by the tap."""
        return self.published | self.routed

    @property
    def lost(self) -> set[str]:
        """Sent, but neither folded nor rejected with a reason."""
        return self.sent - set(self.folded) - set(self.rejected)

    @property
    def counted_twice(self) -> set[str]:
        """Folded into more than one version (or twice into one)."""
        return {u for u, n in self.folded.items() if n > 1}

    @property
    def folded_and_rejected(self) -> set[str]:
        """Folded and also rejected (a redelivered duplicate; not lost, not counted twice)."""
        return set(self.folded) & set(self.rejected)

    @property
    def unknown(self) -> set[str]:
        """Folded or rejected ids that no worker sent and the tap never saw."""
        return (set(self.folded) | set(self.rejected)) - self.sent


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a .jsonl file (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def drain_dead(broker: str, queue: str) -> tuple[dict[str, str], Counter[str]]:
    """Read the dead queue to its end: update id -> reason, and other messages by type/reason."""
    updates: dict[str, str] = {}
    other: Counter[str] = Counter()
    connection = pika.BlockingConnection(pika.URLParameters(broker))
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                break
            reason = read_dead_letter(properties.headers or {}).reason
            try:
                message = msgpack.unpackb(body, raw=False)
                kind = message.get("type", "?") if isinstance(message, dict) else "?"
            except Exception:
                message, kind = None, "undecodable"
            if kind == "update" and isinstance(message, dict):
                updates[str(message["update_id"])] = reason
            else:
                other[f"{kind}:{reason}"] += 1
    finally:
        connection.close()
    return updates, other


def account(
    run_dir: Path,
    published: list[str],
    routed: list[str],
    dead: dict[str, str],
    other: Counter[str],
) -> Accounts:
    """Compare what was sent with what the run directory and the dead queue say happened."""
    folded: Counter[str] = Counter()
    versions = 0
    for record in read_jsonl(run_dir / "history.jsonl"):
        versions = max(versions, int(record["version"]))
        folded.update(record["update_ids"])
    rejected: dict[str, str] = {}
    for record in read_jsonl(run_dir / "rejections.jsonl"):
        rejected[record["update_id"]] = record["reason"]
    # Dead-lettered as job_finished: they came after the job ended (the run directory lists them
    # too, with the updates left in a buffer at the end, which were never dead-lettered).
    late = {update_id for update_id, reason in dead.items() if reason == "job_finished"}
    for update_id, reason in dead.items():
        rejected.setdefault(update_id, reason)
    return Accounts(
        set(published),
        set(routed),
        folded,
        rejected,
        late,
        other,
        versions,
        len(published) - len(set(published)),
    )


# ---------------------------------------------------------------- the run


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job_spec(args: argparse.Namespace) -> JobSpec:
    """The load job: the chosen model, asynchronous strategy, a wall-clock stop."""
    model, dataset = MODELS[args.model]
    return JobSpec(
        name="load",
        model=model,
        dataset=dataset,
        strategy=StrategyConfig(
            name=args.strategy, buffer_size=args.buffer_size, min_workers=args.workers
        ),
        stop=StopConfig(max_versions=10_000_000, max_time_s=float(args.seconds)),
        eval_every=args.eval_every,
    )


def start_aggregator(args: argparse.Namespace, prefix: str, run_dir: Path, port: int) -> Any:
    """The real aggregator service in its own process, serving until SIGTERM."""
    log = open(run_dir / "aggregator.log", "wb")  # noqa: SIM115 - lives as long as the process
    root = Path(__file__).resolve().parents[1]
    # Another bench may run the service under a wrapper (e.g. with tracemalloc on).
    launcher = getattr(args, "aggregator_launcher", None) or ["-m", "aggregator"]
    argv = [sys.executable, *launcher, "--broker", args.broker, "--prefix", prefix]
    argv += ["--state-dir", str(run_dir / "state"), "--output-dir", str(run_dir / "job")]
    argv += ["--metrics-port", str(port), "--log-level", args.log_level]
    env = dict(os.environ)
    if args.torch_threads:
        # Read by torch's OpenMP runtime at start-up: the service itself is left as shipped.
        env |= {
            "OMP_NUM_THREADS": str(args.torch_threads),
            "MKL_NUM_THREADS": str(args.torch_threads),
        }
    return subprocess.Popen(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)


def alive(aggregator: Any, run_dir: Path) -> None:
    """Stop the run if the aggregator process has exited."""
    if aggregator.poll() is not None:
        raise SystemExit(
            f"load: the aggregator exited ({aggregator.returncode}); see {run_dir}/aggregator.log"
        )


def list_queue(queue: str) -> str:
    """Ready and unacknowledged messages of a queue from rabbitmqctl (a local broker only)."""
    if shutil.which("rabbitmqctl") is None:
        return "n/a"
    try:
        out = subprocess.run(
            [
                "rabbitmqctl",
                "-q",
                "list_queues",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == queue:
            return f"{parts[1]} ready / {parts[2]} unacked"
    return "n/a"


def wait_for(what: str, condition: Any, timeout: float, interval: float = 0.2) -> None:
    """Poll `condition` until it holds; give up with an error after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"load: timed out waiting for {what}")
        time.sleep(interval)


def split(items: list[str], parts: int) -> list[list[str]]:
    """Deal items round-robin into `parts` non-empty groups."""
    groups = [items[i::parts] for i in range(parts)]
    return [g for g in groups if g]


@dataclass
class Harness:
    """The processes and observers of one run."""

    args: argparse.Namespace
    topology: Topology
    run_dir: Path
    port: int
    tap: Tap
    probe: Probe
    aggregator: Any
    samples: Samples = field(default_factory=Samples)
    t0: float = 0.0

    def sample(self, t0: float) -> Sample:
        """Check that the aggregator lives, then take one sample."""
        alive(self.aggregator, self.run_dir)
        return self.samples.take(
            t0, self.probe, self.topology.updates, self.tap, self.aggregator.pid, self.port
        )


@dataclass
class Outcome:
    """Everything one run measured, for report() or another bench."""

    accounts: Accounts
    samples: Samples
    figures: Figures
    workers: list[dict[str, Any]]
    run_dir: Path

    @property
    def bad(self) -> bool:
        """An update lost, counted twice or unknown, one left queued, or a worker error."""
        a = self.accounts
        troubles = a.lost or a.counted_twice or a.unknown or self.figures.leftover
        return bool(troubles) or any(r["error"] for r in self.workers)


def run(args: argparse.Namespace) -> int:
    """Run the load and print its figures; return the exit status."""
    outcome = execute(args)
    report(args, outcome.accounts, outcome.samples, outcome.figures)
    return 1 if outcome.bad else 0


def execute(args: argparse.Namespace) -> Outcome:
    """Run the load once under a fresh topology, deleted at the end; return what it measured."""
    prefix = f"fedq-load-{uuid.uuid4().hex[:8]}"
    topology = Topology(prefix)
    run_dir = Path(args.out) / prefix
    run_dir.mkdir(parents=True)
    worker_ids = [f"load{i:03d}" for i in range(args.workers)]
    tap = Tap(args.broker, topology)
    probe: Probe | None = None
    aggregator = None
    procs: list[Any] = []
    try:
        submit(args, topology)
        tap.start()
        probe = Probe(args.broker)
        port = free_port()
        aggregator = start_aggregator(args, prefix, run_dir, port)
        wait_for("the aggregator", lambda: probe.depth(topology.updates)[1] >= 1, 120)
        h = Harness(args, topology, run_dir, port, tap, probe, aggregator)
        ctx = mp.get_context("spawn")
        stop_at, ready, results = ctx.Value("d", 0.0), ctx.Value("i", 0), ctx.Queue()
        config = {
            "prefix": prefix,
            "broker": args.broker,
            "think_ms": args.think_ms,
            "num_samples": args.num_samples,
        }
        groups = split(worker_ids, args.procs)
        for group in groups:
            proc = ctx.Process(target=worker_group, args=(group, config, stop_at, ready, results))
            proc.start()
            procs.append(proc)
        wait_for("the workers' hellos", lambda: ready.value >= args.workers, 120)
        window = load_window(h, stop_at, [proc.pid for proc in procs])
        worker_results = collect(procs, results, len(groups))
        figures = finish(h, window, worker_results)
        published = [u for r in worker_results for u in r["published"]]
        dead, other = drain_dead(args.broker, topology.dead)
        accounts = account(run_dir / "job", published, tap.ids, dead, other)
        (run_dir / "samples.json").write_text(json.dumps([asdict(s) for s in h.samples.rows]))
        return Outcome(accounts, h.samples, figures, worker_results, run_dir)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        if aggregator is not None and aggregator.poll() is None:
            aggregator.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                aggregator.wait(30)
        tap.stop()
        if probe is not None:
            probe.close()
        teardown(args.broker, topology, worker_ids)


def submit(args: argparse.Namespace, topology: Topology) -> None:
    """Declare the topology and put the load job on the job queue."""
    job_id = f"load-{uuid.uuid4().hex[:8]}"
    # Its own short-lived connection: idle for the whole run it would miss heartbeats.
    admin = RabbitMQTransport(args.broker, topology, connection_name="fedq-load submit")
    try:
        admin.declare()
        admin.publish(topology.jobs, JOB_ROUTING_KEY, encode_message(Job(job_id, job_spec(args))))
    finally:
        admin.close()


@dataclass
class Window:
    """The load window: how long it lasted, its samples, the CPU it took."""

    seconds: float
    samples: int
    cpu: dict[str, float]
    mid_run: str


def load_window(h: Harness, stop_at: Any, worker_pids: list[int]) -> Window:
    """Open the window (the workers stop publishing at its end) and sample it every second."""
    args = h.args
    cpu = CpuMeter(
        {
            "aggregator": [h.aggregator.pid],
            "rabbitmq": broker_pids(),
            "workers": worker_pids,
            "harness (tap, probe)": [os.getpid()],
        }
    )
    cpu.start()
    t0 = h.t0 = time.monotonic()
    stop_at.value = time.time() + args.seconds
    print(f"load: {h.topology.prefix}: {args.workers} workers for {args.seconds:g} s", flush=True)
    mid_run: str | None = None
    while time.monotonic() - t0 < args.seconds:
        if mid_run is None and time.monotonic() - t0 >= args.seconds / 2:
            mid_run = list_queue(h.topology.updates)
        row = h.sample(t0)
        if not args.quiet:
            print(
                f"  t={row.t:5.1f}s routed {len(h.tap.ids):6d}  received {row.received:6d}"
                f"  queue {row.ready:4d}  lag {row.lag:4d}  version {row.version:6d}"
                f"  rss {row.rss_kib / 1024:6.1f} MiB",
                flush=True,
            )
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0) % 1.0))
    seconds = time.monotonic() - t0
    cpu.stop()
    return Window(seconds, len(h.samples.rows), cpu.used, mid_run or "n/a")


def finish(h: Harness, window: Window, workers: list[dict[str, Any]]) -> Figures:
    """Wait for the job to end and the aggregator to drain, stop it, settle the tap."""
    summary_path = h.run_dir / "job" / "summary.json"

    def drained() -> bool:
        row = h.sample(h.t0)
        return summary_path.exists() and row.ready == 0 and (row.lag <= 0 or not row.scraped)

    started = time.monotonic()
    wait_for("the aggregator to drain", drained, h.args.drain_timeout, interval=1.0)
    drain_s = time.monotonic() - started
    time.sleep(1.0)  # the last acks and dead-letters
    peak_rss = rss_kib(h.aggregator.pid, "VmHWM")
    h.aggregator.send_signal(signal.SIGTERM)
    h.aggregator.wait(60)
    wait_for("the tap", lambda: h.probe.depth(h.tap.queue)[0] == 0, 30)
    time.sleep(0.5)
    h.tap.stop()
    return Figures(
        window=window,
        drain_s=drain_s,
        peak_rss_kib=peak_rss,
        leftover=h.probe.depth(h.topology.updates)[0],
        summary=json.loads(summary_path.read_text()),
        workers=workers,
    )


def teardown(broker: str, topology: Topology, worker_ids: list[str]) -> None:
    """Delete the run's queues and exchanges (the tap's queue went with its consumer)."""
    transport = RabbitMQTransport(broker, topology, connection_name="fedq-load teardown")
    try:
        transport.teardown(worker_ids)
    finally:
        transport.close()


def collect(procs: list[Any], results: Any, expected: int) -> list[dict[str, Any]]:
    """Take every worker group's results (before joining: a full pipe would block the child)."""
    out: list[dict[str, Any]] = []
    for _ in range(expected):
        out.extend(results.get(timeout=120))
    for proc in procs:
        proc.join(30)
    return out


# ---------------------------------------------------------------- report


@dataclass
class Figures:
    """What the run measured besides the accounts."""

    window: Window
    drain_s: float
    peak_rss_kib: int
    leftover: int
    summary: dict[str, Any]
    workers: list[dict[str, Any]]


def report(args: argparse.Namespace, a: Accounts, samples: Samples, f: Figures) -> None:
    """Print the figures as a Markdown table."""
    during = samples.rows[: f.window.samples] or samples.rows
    ready = [s.ready for s in during]
    lag = [s.lag for s in during if s.scraped] or [0]
    rss = [s.rss_kib for s in samples.rows if s.rss_kib]
    first, last = samples.rate(during, 0.0, 0.25), samples.rate(during, 0.75, 1.0)
    folded = len(a.folded)
    only_rejected = set(a.rejected) - set(a.folded)
    reasons = Counter(a.rejected[u] for u in only_rejected)
    late = len(only_rejected & a.late)
    errors = [f"{r['worker_id']}: {r['error']}" for r in f.workers if r["error"]]
    strategy = args.strategy + (
        f", buffer {args.buffer_size}" if args.strategy == "fedbuff" else ""
    )
    low, high = args.think_ms
    cpu = ", ".join(f"{name} {cores:.2f}" for name, cores in f.window.cpu.items())
    rows = [
        ("workers", f"{args.workers} ({args.procs} processes), think {low:g}-{high:g} ms"),
        ("model", f"{args.model} {MODELS[args.model][0].input_shape} on {MODELS[args.model][1]}"),
        (
            "strategy",
            f"{strategy}, eval every {args.eval_every}, "
            f"aggregator torch threads {args.torch_threads or 'default'}",
        ),
        ("seconds", f"{f.window.seconds:.1f} (then {f.drain_s:.1f} s to drain)"),
        ("updates published (confirmed)", f"{len(a.published)}"),
        ("updates routed (tap)", f"{len(a.routed)}"),
        ("updates/s", f"{len(a.published) / f.window.seconds:.1f}"),
        ("folded", f"{folded} ({folded / f.window.seconds:.1f}/s)"),
        ("received/s, first / last quarter", f"{first:.1f} / {last:.1f}"),
        (
            "rejected",
            f"{sum(reasons.values())} {json.dumps(dict(sorted(reasons.items())))}, "
            f"{late} of them after the job ended",
        ),
        ("lost", f"{len(a.lost)}"),
        ("counted twice", f"{len(a.counted_twice)}"),
        ("folded and also rejected", f"{len(a.folded_and_rejected)}"),
        ("unknown ids / published twice", f"{len(a.unknown)} / {a.double_published}"),
        ("left in updates queue", f"{f.leftover}"),
        ("versions", f"{a.versions} (stop: {f.summary['stop_reason']})"),
        ("backlog: queue ready max / mean", f"{max(ready)} / {np.mean(ready):.1f}"),
        ("backlog: routed - received max / mean", f"{max(lag)} / {np.mean(lag):.1f}"),
        ("updates queue at mid-run (rabbitmqctl)", f.window.mid_run),
        (
            "aggregator RSS start / end / peak",
            f"{rss[0] / 1024:.0f} / {rss[-1] / 1024:.0f} / {f.peak_rss_kib / 1024:.0f} MiB"
            if rss
            else "n/a",
        ),
        ("CPU, cores busy", cpu),
        (
            "tasks received / superseded",
            f"{sum(r['tasks'] for r in f.workers)} / {sum(r['superseded'] for r in f.workers)}",
        ),
        ("dead queue, other messages", json.dumps(dict(a.dead_other)) if a.dead_other else "0"),
        ("worker errors", f"{len(errors)}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n| {'figure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key:<{width}} | {value} |")
    for line in errors[:10]:
        print(f"worker error: {line}")
    if a.lost:
        print(f"lost, e.g.: {sorted(a.lost)[:5]}")
    if a.counted_twice:
        print(f"counted twice, e.g.: {sorted(a.counted_twice)[:5]}")


def parse_think(text: str) -> tuple[float, float]:
    """'50,200' -> (50.0, 200.0); '100' -> (100.0, 100.0)."""
    parts = [float(p) for p in text.split(",")]
    low, high = parts[0], parts[-1]
    if not 0 <= low <= high or len(parts) > 2:
        raise argparse.ArgumentTypeError("--think-ms takes LOW,HIGH with 0 <= LOW <= HIGH")
    return low, high


def build_parser(description: str | None = __doc__) -> argparse.ArgumentParser:
    """The load's flags (other benches parse theirs with it too)."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--workers", type=int, default=50)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--strategy", choices=("fedbuff", "fedasync"), default="fedbuff")
    p.add_argument("--model", choices=sorted(MODELS), default="mlp", help="the job's model")
    p.add_argument("--broker", default=DEFAULT_BROKER)
    p.add_argument("--think-ms", type=parse_think, default=(50.0, 200.0), help="LOW,HIGH")
    p.add_argument("--procs", type=int, default=2, help="worker processes (threads split)")
    p.add_argument("--buffer-size", type=int, default=10, help="fedbuff buffer size")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N versions")
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS for the aggregator process (0: torch's default)",
    )
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument("--out", default="runs/load")
    p.add_argument("--log-level", default="INFO", help="the aggregator's log level")
    p.add_argument("--quiet", action="store_true", help="no per-second lines")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and run the load."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.workers < 1 or args.procs < 1 or args.seconds <= 0:
        p.error("--workers and --procs must be >= 1 and --seconds > 0")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
