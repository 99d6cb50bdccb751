"""Aggregator ingest against a bare pika consumer, and FedAvg arithmetic against Flower's.

    .venv/bin/python bench/ingest.py [--updates 100] [--repeat 2] [--broker amqp://...]
    .venv/bin/pip install -e '.[bench]'     # Flower, for the aggregation comparison

Part 1, ingest through RabbitMQ. N updates of the FedAvg CNN (1,663,370 parameters, 6.7 MB each,
one per worker id) are published once to the updates exchange, which routes every message to two
queues of the same kind (quorum, single active consumer): the aggregator's updates queue and a
second one for the bare consumer. Then, in the same process and one after the other:
- the bare consumer: pika's BlockingConnection, prefetch 64 (the aggregator's), basic_consume,
  each delivery acked as it arrives: what reading the queue costs and nothing else;
- the aggregator: the real AggregatorService over the real RabbitMQTransport, already running a
  FedAvg job whose round closes at N updates (min_updates N, max_versions 1). The clock runs
  from subscribing to the updates queue until every update is decoded, validated, folded,
  included in a checkpoint on disk (the round's new version, and every 32 updates before it)
  and acked. The new version's evaluation on the 1,000 held-out digits runs on the aggregator's
  evaluation thread and is not waited for, as in production.
The order of the two alternates between repeats. Prints updates/s and MB/s of each, and the ratio
aggregator / bare consumer (target >= 0.85).

Part 2, the aggregation step alone, in memory, on N updates: fedq's streaming weighted sum
(aggregator.aggregation.fedavg) against Flower's `flwr.server.strategy.aggregate.aggregate` over
the same (arrays, num_examples) pairs, each in a fresh process of its own: the first call (what a
process that aggregates a round of fresh updates pays, page faults of new memory included) and the
median of the later calls (memory the allocator already holds is reused). The two averages are
checked equal. Target: fedq >= 10x.

Everything runs under a fresh topology prefix (fedq-ingest-<hex>) that is deleted at the end.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pika
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.aggregation import fedavg
from aggregator.metrics import AggregatorMetrics
from aggregator.service import AggregatorService
from aggregator.settings import AggregatorSettings
from aggregator.tasks import TaskIds, load_task_key
from broker.rabbitmq import DEFAULT_PREFETCH, RabbitMQTransport, read_in_large_pieces
from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY, Topology
from broker.transport import Delivery
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig
from shared.messages import Job, Update, encode_message
from shared.models import build_model, state_to_numpy

DEFAULT_BROKER = os.environ.get("FEDQ_BENCH_BROKER", "amqp://guest:guest@localhost:5672/")
CNN = ModelSpec("cnn", (1, 28, 28), 10)
UPDATE_MB = 6.654  # one encoded CNN update


def make_updates(
    job_id: str, count: int, seed: int = 0, tasks: TaskIds | None = None
) -> list[Update]:
    """`count` FedAvg updates of the CNN: the initial weights plus small noise, one per worker,
    each answering a task of version 0 issued with `tasks` (the aggregator's task key)."""
    base = state_to_numpy(build_model(CNN, seed=seed))
    rng = np.random.default_rng(seed)
    updates = []
    for i in range(count):
        tensors = {
            name: (a + rng.normal(0, 0.01, a.shape).astype(a.dtype)) if a.dtype.kind == "f" else a
            for name, a in base.items()
        }
        updates.append(
            Update(
                job_id=job_id,
                update_id=uuid.uuid4().hex,
                worker_id=f"w{i:04d}",
                task_id=tasks.issue(f"w{i:04d}", 0) if tasks else uuid.uuid4().hex,
                base_version=0,
                round=0,
                kind="weights",
                num_samples=int(rng.integers(50, 150)),
                metrics={"loss": 0.5},
                sent_at=time.time(),
                tensors=tensors,
            )
        )
    return updates


def job_of(job_id: str, count: int) -> Job:
    """A FedAvg job on the CNN whose single round closes once `count` updates are in."""
    spec = JobSpec(
        name="ingest",
        model=CNN,
        dataset="mnist5k",
        strategy=StrategyConfig(name="fedavg", min_updates=count, round_deadline_s=3600.0),
        stop=StopConfig(max_versions=1),
    )
    return Job(job_id=job_id, spec=spec, submitted_at=time.time())


class Bench:
    """One topology with the aggregator's updates queue and a twin queue for the bare consumer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.topology = Topology(f"fedq-ingest-{uuid.uuid4().hex[:8]}")
        self.bare_queues = {
            "pika": f"{self.topology.prefix}.bare",
            "pika-1MiB": f"{self.topology.prefix}.bare-1mib",
        }
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def declare(self) -> None:
        """The shared topology (as the aggregator declares it) and the bare consumer's twin."""
        t = RabbitMQTransport(self.url, self.topology)
        t.declare()
        t.close()
        for queue in self.bare_queues.values():
            self.channel.queue_declare(
                queue, durable=True, arguments=self.topology.updates_queue_arguments()
            )
            self.channel.queue_bind(queue, self.topology.updates, UPDATE_ROUTING_KEY)

    def publish_job(self, job: Job) -> None:
        """Submit the job as `fedq submit` does."""
        self.channel.basic_publish(
            self.topology.jobs,
            JOB_ROUTING_KEY,
            encode_message(job),
            pika.BasicProperties(delivery_mode=2),
        )

    def fill(self, bodies: list[bytes]) -> None:
        """Publish every body once; the exchange routes each to both queues."""
        for body in bodies:
            self.channel.basic_publish(
                self.topology.updates,
                UPDATE_ROUTING_KEY,
                body,
                pika.BasicProperties(delivery_mode=2),
                mandatory=True,
            )

    def depth(self, queue: str) -> int:
        """Messages ready in a queue."""
        frame = self.channel.queue_declare(queue, passive=True)
        return int(frame.method.message_count)

    def wait_depth(self, queue: str, count: int, timeout: float = 60.0) -> None:
        """Wait until a queue holds `count` ready messages (quorum queues apply asynchronously)."""
        deadline = time.monotonic() + timeout
        while self.depth(queue) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"{queue} holds {self.depth(queue)} of {count} messages")
            time.sleep(0.1)

    def drain_bare(self, count: int, kind: str) -> float:
        """Consume and ack `count` messages from a twin queue; return the seconds it took.

        kind "pika": pika as it comes; "pika-1MiB": with the 1 MiB socket reads that fedq's
        transport sets (pika's own default is 4 KiB per recv()).
        """
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        if kind == "pika-1MiB" and not read_in_large_pieces(connection):
            raise SystemExit("this pika cannot be told to read in large pieces")
        channel = connection.channel()
        channel.basic_qos(prefetch_count=DEFAULT_PREFETCH)
        started = time.perf_counter()
        deliveries = channel.consume(self.bare_queues[kind])
        for received, (method, _properties, _body) in enumerate(deliveries, start=1):
            channel.basic_ack(method.delivery_tag)
            if received == count:
                break
        elapsed = time.perf_counter() - started
        channel.cancel()
        connection.close()
        return elapsed

    def drain_aggregator(self, job: Job, count: int, state_dir: Path) -> tuple[float, float]:
        """Start the job on a real AggregatorService, then time it taking in `count` updates.

        Returns (seconds to ingest and ack them all, final accuracy of the version they made).
        """
        settings = AggregatorSettings(
            broker=self.url, state_dir=str(state_dir), prefix=self.topology.prefix
        )
        transport = RabbitMQTransport(self.url, self.topology)
        service = AggregatorService(transport, settings, AggregatorMetrics(CollectorRegistry()))
        try:
            transport.declare()
            transport.subscribe(self.topology.jobs)
            deadline = time.monotonic() + 60
            while service._job is None:  # the job's set-up (model, evaluator) is not timed
                service.step(0.1)
                if time.monotonic() > deadline:
                    raise SystemExit("the aggregator did not start the job")
            acked: list[float] = []
            settle = transport.ack

            def ack(delivery: Delivery) -> None:
                settle(delivery)
                if delivery.queue == self.topology.updates:
                    acked.append(time.perf_counter())

            transport.ack = ack  # type: ignore[method-assign]
            started = time.perf_counter()
            transport.subscribe(self.topology.updates)
            while service.jobs_done == 0:
                service.step(0.5)
                if time.perf_counter() - started > 600:
                    raise SystemExit("the aggregator did not finish the round in 600 s")
            if len(acked) != count:
                raise SystemExit(f"the aggregator acked {len(acked)} of {count} updates")
            elapsed = acked[-1] - started
            summary = (state_dir / "jobs" / job.job_id / "summary.json").read_text()
            accepted = json.loads(summary)["updates_accepted"]
            if accepted != count:
                raise SystemExit(f"the aggregator accepted {accepted} of {count} updates")
            return elapsed, float(json.loads(summary)["final_accuracy"])
        finally:
            transport.close()

    def teardown(self) -> None:
        """Delete the bench's queues and exchanges."""
        for queue in self.bare_queues.values():
            self.channel.queue_delete(queue)
        t = RabbitMQTransport(self.url, self.topology)
        t.teardown([])
        t.close()
        self.connection.close()


def ingest(url: str, count: int, repeat: int) -> list[dict[str, float]]:
    """Run part 1 `repeat` times; return the seconds of each consumer per repeat."""
    results = []
    for i in range(repeat):
        bench = Bench(url)
        state = tempfile.TemporaryDirectory(prefix="fedq-ingest-")
        try:
            bench.declare()
            job = job_of(f"ingest-{uuid.uuid4().hex[:8]}", count)
            # The aggregator takes only updates for tasks it issued: sign them with its key.
            tasks = TaskIds(load_task_key(Path(state.name)), job.job_id)
            updates = make_updates(job.job_id, count, seed=i, tasks=tasks)
            bodies = [encode_message(u) for u in updates]
            del updates
            bench.publish_job(job)
            bench.fill(bodies)
            for queue in [*bench.bare_queues.values(), bench.topology.updates]:
                bench.wait_depth(queue, count)
            del bodies
            gc.collect()
            order = ["pika", "pika-1MiB", "aggregator"]
            if i % 2:
                order.reverse()
            seconds: dict[str, float] = {}
            for kind in order:
                if kind == "aggregator":
                    seconds[kind], accuracy = bench.drain_aggregator(job, count, Path(state.name))
                else:
                    seconds[kind] = bench.drain_bare(count, kind)
            cells = " | ".join(
                f"{count / seconds[k]:6.1f} | {count * UPDATE_MB / seconds[k]:5.0f}"
                for k in ("pika", "pika-1MiB", "aggregator")
            )
            print(
                f"| {i + 1} | {', '.join(order)} | {cells} "
                f"| {seconds['pika'] / seconds['aggregator']:5.2f} "
                f"| {seconds['pika-1MiB'] / seconds['aggregator']:5.2f} | {100 * accuracy:4.1f} |",
                flush=True,
            )
            results.append(seconds)
        finally:
            bench.teardown()
            state.cleanup()
    return results


def _aggregate_in_fresh_process(which: str, count: int, repeat: int) -> tuple[float, float, str]:
    """In this (fresh) process: (first call s, median of the next `repeat` s, result digest)."""
    updates = make_updates("agg", count)
    reference = updates[0].tensors
    if which == "fedq":
        pairs: list[Any] = [(u.tensors, float(u.num_samples)) for u in updates]

        def run() -> list[np.ndarray]:
            return list(fedavg(pairs, reference).values())
    else:
        from flwr.server.strategy.aggregate import aggregate as flower_aggregate

        lists = [(list(u.tensors.values()), u.num_samples) for u in updates]

        def run() -> list[np.ndarray]:
            return list(flower_aggregate(lists))

    times = []
    for _ in range(repeat + 1):
        gc.collect()
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    # Rounded, so that the two implementations' float32 sums in other orders compare equal.
    digest = hashlib.sha256(b"".join(np.round(a, 4).tobytes() for a in result)).hexdigest()
    return times[0], float(np.median(times[1:])), digest


def aggregation(count: int, repeat: int) -> dict[str, tuple[float, float]] | None:
    """Part 2: (first call s, warm median s) of fedq and of Flower, each in a fresh process."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        print("flwr is not installed: `pip install -e '.[bench]'` for the Flower comparison")
        return None
    out: dict[str, tuple[float, float]] = {}
    digests = set()
    spawn = multiprocessing.get_context("spawn")
    for which in ("fedq", "flower"):
        with spawn.Pool(1) as pool:
            first, warm, digest = pool.apply(_aggregate_in_fresh_process, (which, count, repeat))
        out[which] = (first, warm)
        digests.add(digest)
    if len(digests) != 1:
        raise SystemExit("fedq and Flower computed different averages")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--updates", type=int, default=100, help="updates per drain")
    p.add_argument("--repeat", type=int, default=2, help="drains of each consumer")
    p.add_argument("--broker", default=DEFAULT_BROKER)
    p.add_argument("--skip-ingest", action="store_true", help="only the aggregation step")
    p.add_argument("--skip-aggregation", action="store_true", help="only the ingest")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ratios = []
    if not args.skip_ingest:
        print("\n## ingest: FedAvg CNN updates drained from a pre-filled RabbitMQ queue")
        print(
            "| repeat | order | bare pika upd/s | MB/s | bare pika, 1 MiB reads upd/s | MB/s "
            "| aggregator upd/s | MB/s | aggregator / bare pika | aggregator / bare 1 MiB "
            "| accuracy % |\n|---|---|---|---|---|---|---|---|---|---|---|",
            flush=True,
        )
        runs = ingest(args.broker, args.updates, args.repeat)
        total = {k: sum(r[k] for r in runs) for k in ("pika", "pika-1MiB", "aggregator")}
        rate = {k: args.updates * len(runs) / s for k, s in total.items()}
        ratios.append(
            f"ingest: aggregator / bare pika consumer = {rate['aggregator'] / rate['pika']:.2f} "
            f"({rate['aggregator']:.1f} against {rate['pika']:.1f} updates/s; target >= 0.85)"
        )
        ratios.append(
            "ingest: aggregator / bare pika consumer with the same 1 MiB reads = "
            f"{rate['aggregator'] / rate['pika-1MiB']:.2f} ({rate['pika-1MiB']:.1f} updates/s)"
        )
    if not args.skip_aggregation:
        print(f"\n## aggregation alone: FedAvg of {args.updates} CNN updates in memory")
        timed = aggregation(args.updates, max(3, args.repeat))
        if timed is not None:
            gb = args.updates * 1_663_370 * 4 / 1e9
            print(
                "| implementation | first call s | upd/s | GB/s | later calls s (median) | upd/s "
                "| GB/s |\n|---|---|---|---|---|---|---|"
            )
            names = {"fedq": "fedq fedavg (streaming)", "flower": "Flower aggregate()"}
            for which, (first, warm) in timed.items():
                print(
                    f"| {names[which]} | {first:.3f} | {args.updates / first:6.0f} "
                    f"| {gb / first:5.2f} | {warm:.3f} | {args.updates / warm:6.0f} "
                    f"| {gb / warm:5.2f} |"
                )
            (ours_first, ours_warm), (theirs_first, theirs_warm) = timed["fedq"], timed["flower"]
            ratios.append(
                f"aggregation: fedq / Flower speed = {theirs_first / ours_first:.1f}x on a "
                f"process's first call, {theirs_warm / ours_warm:.1f}x on later calls "
                "(target >= 10)"
            )
    print("\n## ratios")
    for line in ratios:
        print(f"- {line}")


if __name__ == "__main__":
    main()
