"""Settings of the worker service."""

from __future__ import annotations

from dataclasses import dataclass

from shared.chunks import DEFAULT_CHUNK_SIZE
from shared.references import check_allowed_modules


@dataclass(frozen=True)
class WorkerSettings:
    """Who the worker is, where it connects, its local data and device, how it paces itself."""

    worker_id: str = ""
    broker: str = "amqp://guest:guest@localhost:5672/"
    prefix: str = "fedq"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # Local data: a path (.npz file, ImageFolder directory) or a data set spec; or, for
    # simulation, a built-in data set with a partition of it.
    data: str = ""
    dataset: str = ""
    partition: str = "iid"
    num_partitions: int = 1
    partition_index: int = 0
    device: str = "auto"
    # Local data that takes at most this many MiB as tensors is put on the device whole (the
    # fastest path); a larger set is read in batches from its files through a DataLoader with
    # `loader_workers` processes reading and decoding (0: in the training thread).
    in_memory_max_mb: float = 512.0
    loader_workers: int = 2
    # Stretches each training's wall-clock by this factor (sleeping), to emulate slow hardware.
    slowdown: float = 1.0
    hello_interval_s: float = 5.0
    # Started before the aggregator, a worker checks this often for the updates exchange it
    # publishes to (declared by the aggregator or `fedq broker`), instead of exiting.
    wait_for_topology_s: float = 2.0
    poll_interval_s: float = 0.5
    # Every worker of a simulation must cut the same split, so the partition has its own seed;
    # `seed` drives this worker's batch order.
    partition_seed: int = 0
    seed: int = 0
    threads: int = 0
    metrics_port: int = 0
    # The address /metrics and /healthz listen on ("0.0.0.0": every IPv4 interface).
    metrics_host: str = "0.0.0.0"
    # /healthz answers 503 once the service loop has not gone round for this many seconds.
    health_timeout_s: float = 60.0
    # Publish with the broker-validated user_id (the aggregator's require_user_id checks it
    # against the worker id: the broker user must be named like the worker).
    stamp_user_id: bool = False
    # False in a least-privilege deployment: the task queue is made by `fedq broker add-worker`
    # and the worker only checks that it exists (its user may not declare anything).
    declare_topology: bool = True
    # Modules a task's `package.module:function` model may be imported from: each entry allows
    # that module and its submodules (shared.references); built-in models need none. The
    # worker's own `data`/`dataset` reference is this operator's choice and always allowed.
    allowed_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_allowed_modules(self.allowed_modules)
