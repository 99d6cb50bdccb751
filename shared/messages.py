"""Wire messages (job, task, model, update, hello) and their msgpack codec with validation."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from shared.errors import (
    FieldError,
    MalformedMessageError,
    ProtocolError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
)
from shared.jobs import JobSpec, ModelSpec, TrainingConfig, from_dict, to_dict
from shared.tensors import Tensors, decode_tensors, encode_tensors

PROTOCOL_VERSION = 1
# Ids name queues and routing keys, so they are restricted to a safe alphabet.
# \Z, not $: $ also matches before a trailing newline, which would let "abc\n" through.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
MAX_NUM_SAMPLES = 1_000_000_000
MAX_METRICS = 64


@dataclass(frozen=True)
class Job:
    """A job submission: train `spec` under `job_id`."""

    job_id: str
    spec: JobSpec
    submitted_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class GlobalModel:
    """A version of the global model of a job: its architecture and weights."""

    job_id: str
    version: int
    model: ModelSpec
    tensors: Tensors
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A training task (round announcement) for one worker: train this model with this config."""

    job_id: str
    task_id: str
    worker_id: str
    round: int | None
    training: TrainingConfig
    model: GlobalModel
    issued_at: float = field(default_factory=time.time)

    @property
    def version(self) -> int:
        """The version of the global model the worker trains from."""
        return self.model.version


@dataclass(frozen=True)
class Update:
    """A worker's result: weights or delta trained from `base_version`, with local metrics."""

    job_id: str
    update_id: str
    worker_id: str
    task_id: str
    base_version: int
    round: int | None
    kind: str
    num_samples: int
    tensors: Tensors
    metrics: dict[str, float] = field(default_factory=dict)
    sent_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Hello:
    """A worker announcing that it is alive and idle, so the aggregator may give it a task."""

    worker_id: str
    num_samples: int
    device: str
    sent_at: float = field(default_factory=time.time)


Message = Job | GlobalModel | Task | Update | Hello


# ---------------------------------------------------------------- encoding


def _model_body(model: GlobalModel) -> dict[str, Any]:
    return {
        "job_id": model.job_id,
        "version": model.version,
        "model": to_dict(model.model),
        "metrics": dict(model.metrics),
        "tensors": encode_tensors(model.tensors),
    }


def _body(message: Message) -> tuple[str, dict[str, Any]]:
    if isinstance(message, Job):
        body = {"job_id": message.job_id, "spec": to_dict(message.spec)}
        return "job", body | {"submitted_at": message.submitted_at}
    if isinstance(message, GlobalModel):
        return "model", _model_body(message)
    if isinstance(message, Task):
        return "task", {
            "job_id": message.job_id,
            "task_id": message.task_id,
            "worker_id": message.worker_id,
            "round": message.round,
            "training": to_dict(message.training),
            "model": _model_body(message.model),
            "issued_at": message.issued_at,
        }
    if isinstance(message, Update):
        return "update", {
            "job_id": message.job_id,
            "update_id": message.update_id,
            "worker_id": message.worker_id,
            "task_id": message.task_id,
            "base_version": message.base_version,
            "round": message.round,
            "kind": message.kind,
            "num_samples": message.num_samples,
            "metrics": dict(message.metrics),
            "sent_at": message.sent_at,
            "tensors": encode_tensors(message.tensors),
        }
    if isinstance(message, Hello):
        return "hello", {
            "worker_id": message.worker_id,
            "num_samples": message.num_samples,
            "device": message.device,
            "sent_at": message.sent_at,
        }
    raise TypeError(f"not a fedq message: {type(message).__name__}")


def encode_message(message: Message) -> bytes:
    """Encode a message as a msgpack map with `protocol` and `type` first."""
    kind, body = _body(message)
    packed: bytes = msgpack.packb(
        {"protocol": PROTOCOL_VERSION, "type": kind} | body, use_bin_type=True
    )
    return packed


# ---------------------------------------------------------------- decoding


def _field(body: dict[str, Any], key: str, kinds: tuple[type, ...], nullable: bool = False) -> Any:
    if key not in body:
        raise FieldError(f"missing field {key!r}", reason="missing_field")
    value = body[key]
    if value is None and nullable:
        return None
    # bool is an int subclass; an int field must not accept true/false.
    if type(value) not in kinds:
        names = "/".join(k.__name__ for k in kinds)
        raise FieldError(f"field {key!r} must be {names}, not {type(value).__name__}")
    return value


def _id(body: dict[str, Any], key: str) -> str:
    value = _field(body, key, (str,))
    if not ID_PATTERN.match(value):
        raise FieldError(f"field {key!r} is not a valid id ([A-Za-z0-9._:-], 1-128 chars)")
    return str(value)


def _count(body: dict[str, Any], key: str, nullable: bool = False) -> Any:
    value = _field(body, key, (int,), nullable)
    if value is not None and value < 0:
        raise FieldError(f"field {key!r} must be >= 0")
    return value


def _time(body: dict[str, Any], key: str) -> float:
    value = float(_field(body, key, (int, float)))
    if not math.isfinite(value):
        raise FieldError(f"field {key!r} must be finite")
    return value


def _metrics(body: dict[str, Any]) -> dict[str, float]:
    value = _field(body, "metrics", (dict,))
    if len(value) > MAX_METRICS:
        raise FieldError(f"at most {MAX_METRICS} metrics")
    out: dict[str, float] = {}
    for key, number in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64 or type(number) not in (int, float):
            raise FieldError("metrics must map names of 1-64 characters to numbers")
        # A NaN loss would poison averages and write invalid JSON into the run history.
        if not math.isfinite(number):
            raise FieldError(f"metric {key!r} is not finite", reason="not_finite")
        out[key] = float(number)
    return out


def _decode_model(body: Any) -> GlobalModel:
    if not isinstance(body, dict):
        raise FieldError("field 'model' must be a map")
    return GlobalModel(
        job_id=_id(body, "job_id"),
        version=_count(body, "version"),
        model=from_dict(ModelSpec, _field(body, "model", (dict,)), prefix="model."),
        metrics=_metrics(body),
        tensors=decode_tensors(_field(body, "tensors", (list,))),
    )


def _decode_update(body: dict[str, Any]) -> Update:
    kind = _field(body, "kind", (str,))
    if kind not in ("weights", "delta"):
        raise FieldError("field 'kind' must be 'weights' or 'delta'")
    num_samples = _field(body, "num_samples", (int,))
    if not 0 < num_samples <= MAX_NUM_SAMPLES:
        raise FieldError(
            f"num_samples must be in 1..{MAX_NUM_SAMPLES}, got {num_samples}", "bad_num_samples"
        )
    return Update(
        job_id=_id(body, "job_id"),
        update_id=_id(body, "update_id"),
        worker_id=_id(body, "worker_id"),
        task_id=_id(body, "task_id"),
        base_version=_count(body, "base_version"),
        round=_count(body, "round", nullable=True),
        kind=kind,
        num_samples=num_samples,
        metrics=_metrics(body),
        sent_at=_time(body, "sent_at"),
        tensors=decode_tensors(_field(body, "tensors", (list,))),
    )


def _decode_body(kind: str, body: dict[str, Any]) -> Message:
    if kind == "update":
        return _decode_update(body)
    if kind == "task":
        return Task(
            job_id=_id(body, "job_id"),
            task_id=_id(body, "task_id"),
            worker_id=_id(body, "worker_id"),
            round=_count(body, "round", nullable=True),
            training=from_dict(TrainingConfig, _field(body, "training", (dict,)), "training."),
            model=_decode_model(_field(body, "model", (dict,))),
            issued_at=_time(body, "issued_at"),
        )
    if kind == "model":
        return _decode_model(body)
    if kind == "job":
        return Job(
            job_id=_id(body, "job_id"),
            spec=from_dict(JobSpec, _field(body, "spec", (dict,)), prefix="spec."),
            submitted_at=_time(body, "submitted_at"),
        )
    if kind == "hello":
        return Hello(
            worker_id=_id(body, "worker_id"),
            num_samples=_count(body, "num_samples"),
            device=str(_field(body, "device", (str,)))[:64],
            sent_at=_time(body, "sent_at"),
        )
    raise UnknownMessageTypeError(f"unknown message type {kind!r}")


def decode_message(payload: bytes) -> Message:
    """Decode and validate a message; raise a ProtocolError subclass with a reason on bad input."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as e:
        raise MalformedMessageError(f"not a msgpack message: {type(e).__name__}: {e}") from e
    except Exception as e:  # msgpack raises bare exceptions on some truncations
        raise MalformedMessageError(f"not a msgpack message: {type(e).__name__}: {e}") from e
    if not isinstance(body, dict):
        raise MalformedMessageError("a message must be a msgpack map")
    version = body.get("protocol")
    if type(version) is not int:
        raise MalformedMessageError("missing integer field 'protocol'")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersionError(f"protocol {version} is not supported (this build speaks 1)")
    kind = body.get("type")
    if not isinstance(kind, str):
        raise MalformedMessageError("missing string field 'type'")
    try:
        return _decode_body(kind, body)
    except ProtocolError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FieldError(f"{kind}: {e}") from e
