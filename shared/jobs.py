"""Job specifications: what to train and how, shared by job files, the wire and the services."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from shared.errors import ConfigError, FieldError
from shared.settings import TOMLDecodeError, from_dict, to_dict, toml_load

STRATEGIES = ("fedavg", "fedbuff", "fedasync")
STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")
OPTIMIZERS = ("sgd", "adam")
UPDATE_KINDS = ("weights", "delta")
JOB_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")

__all__ = ["JobSpec", "ModelSpec", "StopConfig", "StrategyConfig", "TrainingConfig", "from_dict"]
__all__ += ["load_job_file", "to_dict"]


@dataclass(frozen=True)
class ModelSpec:
    """Which architecture to build: a registry name, the input shape and the number of classes.

    A job may leave input_shape empty and num_classes 0: they are then taken from its evaluation
    data set when the job is built or arrives (shared.shapes.complete_job). A task's model, and
    any model that is built, has both.
    """

    name: str = "cnn"
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name must not be empty")
        _require(
            len(self.input_shape) <= 8 and all(d >= 1 for d in self.input_shape),
            "model.input_shape must be empty (from the data) or 1 to 8 positive sizes",
        )
        _require(self.num_classes >= 0, "model.num_classes must be >= 1 (or 0: from the data)")

    @property
    def complete(self) -> bool:
        """Whether both the input shape and the number of classes are given."""
        return bool(self.input_shape) and self.num_classes >= 1


@dataclass(frozen=True)
class TrainingConfig:
    """Local training at a worker: E epochs of SGD or Adam, optional FedProx term."""

    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    mu: float = 0.0
    send: str = "weights"
    max_batches: int = 0

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "training.epochs must be >= 1")
        _require(self.batch_size >= 1, "training.batch_size must be >= 1")
        _require(self.optimizer in OPTIMIZERS, f"training.optimizer must be one of {OPTIMIZERS}")
        _require(self.lr > 0, "training.lr must be > 0")
        _require(self.momentum >= 0, "training.momentum must be >= 0")
        _require(self.weight_decay >= 0, "training.weight_decay must be >= 0")
        _require(self.mu >= 0, "training.mu must be >= 0")
        _require(self.send in UPDATE_KINDS, f"training.send must be one of {UPDATE_KINDS}")
        _require(self.max_batches >= 0, "training.max_batches must be >= 0 (0: no limit)")


@dataclass(frozen=True)
class StrategyConfig:
    """Aggregation strategy and its parameters; parameters of other strategies are ignored."""

    name: str = "fedavg"
    # fedavg: a round closes at min_updates, or at the deadline with min_updates_on_deadline.
    fraction: float = 1.0
    min_updates: int = 0
    round_deadline_s: float = 120.0
    min_updates_on_deadline: int = 1
    # every strategy: tasks go out once this many workers have said hello.
    min_workers: int = 1
    # fedbuff: buffer of K updates, server learning rate.
    buffer_size: int = 4
    server_lr: float = 1.0
    # fedasync: mixing weight.
    alpha: float = 0.6
    # staleness: f(s) and the hard limit (None: no limit).
    staleness: str = "polynomial"
    staleness_a: float = 0.5
    staleness_b: float = 4.0
    max_staleness: int | None = None
    # every strategy: reject an update whose change (delta, or weights minus the global model)
    # has an L2 norm above this ratio times the median of recent accepted ones (None: no bound).
    max_update_norm_ratio: float | None = None

    def __post_init__(self) -> None:
        _require(self.name in STRATEGIES, f"strategy.name must be one of {STRATEGIES}")
        _require(0 < self.fraction <= 1, "strategy.fraction must be in (0, 1]")
        _require(self.min_updates >= 0, "strategy.min_updates must be >= 0 (0: all selected)")
        _require(self.round_deadline_s > 0, "strategy.round_deadline_s must be > 0")
        _require(self.min_updates_on_deadline >= 1, "strategy.min_updates_on_deadline >= 1")
        _require(self.min_workers >= 1, "strategy.min_workers must be >= 1")
        _require(self.buffer_size >= 1, "strategy.buffer_size must be >= 1")
        _require(self.server_lr > 0, "strategy.server_lr must be > 0")
        _require(0 < self.alpha <= 1, "strategy.alpha must be in (0, 1]")
        _require(
            self.staleness in STALENESS_FUNCTIONS,
            f"strategy.staleness must be one of {STALENESS_FUNCTIONS}",
        )
        _require(self.staleness_a >= 0, "strategy.staleness_a must be >= 0")
        _require(self.staleness_b >= 0, "strategy.staleness_b must be >= 0")
        _require(
            self.max_staleness is None or self.max_staleness >= 0,
            "strategy.max_staleness must be >= 0",
        )
        _require(
            self.max_update_norm_ratio is None or self.max_update_norm_ratio > 1,
            "strategy.max_update_norm_ratio must be > 1",
        )


@dataclass(frozen=True)
class StopConfig:
    """When a job ends: whichever limit is reached first."""

    max_versions: int | None = 200
    target_accuracy: float | None = None
    max_time_s: float | None = None

    def __post_init__(self) -> None:
        _require(
            self.max_versions is not None or self.max_time_s is not None,
            "stop needs max_versions or max_time_s so that a job always ends",
        )
        _require(self.max_versions is None or self.max_versions >= 1, "stop.max_versions >= 1")
        _require(
            self.target_accuracy is None or 0 < self.target_accuracy <= 1,
            "stop.target_accuracy must be in (0, 1]",
        )
        _require(self.max_time_s is None or self.max_time_s > 0, "stop.max_time_s must be > 0")


@dataclass(frozen=True)
class JobSpec:
    """A whole training job: model, evaluation data, strategy, local training and stop rules."""

    name: str = "job"
    model: ModelSpec = field(default_factory=ModelSpec)
    dataset: str = "mnist5k"
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    seed: int = 0
    eval_every: int = 1

    def __post_init__(self) -> None:
        # The name starts every job id, and ids name queues and routing keys.
        _require(
            JOB_NAME_PATTERN.match(self.name) is not None,
            "name must be 1-64 characters of A-Z a-z 0-9 . _ : - starting with a letter or digit",
        )
        _require(self.eval_every >= 1, "eval_every must be >= 1")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def load_job_file(path: str) -> JobSpec:
    """Read a job TOML file into a JobSpec; errors name the file and the offending key."""
    try:
        with open(path, "rb") as fh:
            data = toml_load(fh)
    except OSError as e:
        raise ConfigError(f"cannot read job file {path}: {e}") from e
    except TOMLDecodeError as e:
        raise ConfigError(f"job file {path} is not valid TOML: {e}") from e
    try:
        return from_dict(JobSpec, data)
    except FieldError as e:
        raise ConfigError(f"job file {path}: {e}") from e
