"""The message codec: a table of message types (wire name, dataclass, body encoder and decoder,
size limit) and encode_message / decode_message over it, with the field validators the decoders
share. Adding a message type is one MessageTypes.register call."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar, cast

from shared.errors import (
    FieldError,
    MalformedMessageError,
    ProtocolError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
)
from shared.jobs import JobSpec, ModelSpec, TrainingConfig, from_dict, to_dict
from shared.msgpack_reader import read_message
from shared.msgpack_writer import pack_message
from shared.schema import (
    ID_PATTERN,
    MAX_FAILURE_DETAIL,
    MAX_METRICS,
    MAX_NUM_SAMPLES,
    PROTOCOL_VERSION,
    REASON_PATTERN,
    Cancel,
    Failure,
    GlobalModel,
    Hello,
    Job,
    Message,
    Task,
    Update,
)
from shared.tensors import decode_tensors, encode_tensors

M = TypeVar("M")


@dataclass(frozen=True)
class MessageType(Generic[M]):
    """One message type: its `type` on the wire, its dataclass, the map of fields its encoder
    makes of a message and the message its decoder makes of that map (raising a ProtocolError
    with a reason on a bad field), and the most bytes its encoding may take (None: only the
    receiver's own bound, for the types that carry a model)."""

    name: str
    cls: type[M]
    encode: Callable[[M], dict[str, Any]]
    decode: Callable[[dict[str, Any]], M]
    max_bytes: int | None = None


class MessageTypes:
    """The message types a codec knows, by wire name and by dataclass."""

    def __init__(self) -> None:
        self._by_name: dict[str, MessageType[Any]] = {}
        self._by_class: dict[type, MessageType[Any]] = {}
        self._limits: dict[str, int] = {}
        # The size limits by type, as the msgpack reader checks them (docs/protocol.md 2.1).
        self.limits: Mapping[str, int] = MappingProxyType(self._limits)

    def register(
        self,
        name: str,
        cls: type[M],
        encode: Callable[[M], dict[str, Any]],
        decode: Callable[[dict[str, Any]], M],
        max_bytes: int | None = None,
    ) -> MessageType[M]:
        """Add a message type; a name or dataclass registered twice is a programming error."""
        if name in self._by_name or cls in self._by_class:
            raise ValueError(f"message type {name!r} ({cls.__name__}) is already registered")
        entry = MessageType(name, cls, encode, decode, max_bytes)
        self._by_name[name] = entry
        self._by_class[cls] = entry
        if max_bytes is not None:
            self._limits[name] = max_bytes
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[MessageType[Any]]:
        return iter(self._by_name.values())

    def named(self, name: str) -> MessageType[Any]:
        """The type whose wire name is `name`; UnknownMessageTypeError if there is none."""
        entry = self._by_name.get(name)
        if entry is None:
            raise UnknownMessageTypeError(f"unknown message type {name!r}")
        return entry

    def of(self, message: object) -> MessageType[Any]:
        """The type of a message object; TypeError if it is not one registered here."""
        for cls in type(message).__mro__:
            entry = self._by_class.get(cls)
            if entry is not None:
                return entry
        raise TypeError(f"not a fedq message: {type(message).__name__}")

    def body(self, message: object) -> tuple[str, dict[str, Any]]:
        """The message's wire name and the map of its fields, without `protocol` and `type`."""
        entry = self.of(message)
        return entry.name, entry.encode(message)

    def encode(self, message: object) -> bytes:
        """Encode a message as a msgpack map with `protocol` and `type` first."""
        name, body = self.body(message)
        return pack_message({"protocol": PROTOCOL_VERSION, "type": name} | body)

    def decode(self, payload: bytes) -> object:
        """Decode and validate a message; raise a ProtocolError subclass with a reason on bad
        input. The size limits hold before anything past them is built (shared/msgpack_reader)."""
        body = read_message(payload, self.limits)
        version = body.get("protocol")
        if type(version) is not int:
            raise MalformedMessageError("missing integer field 'protocol'")
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersionError(
                f"protocol {version} is not supported (this build speaks {PROTOCOL_VERSION})"
            )
        kind = body.get("type")
        if not isinstance(kind, str):
            raise MalformedMessageError("missing string field 'type'")
        try:
            return self.named(kind).decode(body)
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FieldError(f"{kind}: {e}") from e


# ---------------------------------------------------------------- field validators


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


def _metrics(body: dict[str, Any], owner: str) -> dict[str, float]:
    """The metrics map of an update or a global model; `owner` names which in errors, so that a
    worker refusing a task says the task's model metrics are bad, not its own training."""
    value = _field(body, "metrics", (dict,))
    if len(value) > MAX_METRICS:
        raise FieldError(f"at most {MAX_METRICS} metrics")
    out: dict[str, float] = {}
    for key, number in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64 or type(number) not in (int, float):
            raise FieldError("metrics must map names of 1-64 characters to numbers")
        # A NaN loss would poison averages and write invalid JSON into the run history.
        if not math.isfinite(number):
            raise FieldError(f"{owner} metric {key!r} is not finite", reason="not_finite")
        out[key] = float(number)
    return out


def _finite_metrics(metrics: dict[str, float], owner: str) -> dict[str, float]:
    """The metrics to encode; a NaN or Inf is refused here, at the sender, since every receiver
    would reject the message for it (a task with a NaN model loss reached no worker)."""
    for key, number in metrics.items():
        if not math.isfinite(number):
            raise FieldError(
                f"{owner} metric {key!r} is {number!r}: metrics must be finite; not encoded",
                reason="not_finite",
            )
    return dict(metrics)


# ---------------------------------------------------------------- the message types


def _encode_job(job: Job) -> dict[str, Any]:
    return {"job_id": job.job_id, "spec": to_dict(job.spec), "submitted_at": job.submitted_at}


def _decode_job(body: dict[str, Any]) -> Job:
    return Job(
        job_id=_id(body, "job_id"),
        spec=from_dict(JobSpec, _field(body, "spec", (dict,)), prefix="spec."),
        submitted_at=_time(body, "submitted_at"),
    )


def _encode_model(model: GlobalModel) -> dict[str, Any]:
    return {
        "job_id": model.job_id,
        "version": model.version,
        "model": to_dict(model.model),
        "metrics": _finite_metrics(model.metrics, "global model"),
        "tensors": encode_tensors(model.tensors),
    }


def _decode_model(body: Any) -> GlobalModel:
    if not isinstance(body, dict):
        raise FieldError("field 'model' must be a map")
    version = _count(body, "version")
    spec = from_dict(ModelSpec, _field(body, "model", (dict,)), prefix="model.")
    if not spec.complete:
        # Only a job may leave them to its data set; a model that is built has both.
        raise FieldError("model.input_shape and model.num_classes must be given in a model")
    return GlobalModel(
        job_id=_id(body, "job_id"),
        version=version,
        model=spec,
        metrics=_metrics(body, f"the global model's (version {version}, from the aggregator)"),
        tensors=decode_tensors(_field(body, "tensors", (list,))),
    )


def _encode_task(task: Task) -> dict[str, Any]:
    return {
        "job_id": task.job_id,
        "task_id": task.task_id,
        "worker_id": task.worker_id,
        "round": task.round,
        "training": to_dict(task.training),
        "model": _encode_model(task.model),
        "issued_at": task.issued_at,
    }


def _decode_task(body: dict[str, Any]) -> Task:
    return Task(
        job_id=_id(body, "job_id"),
        task_id=_id(body, "task_id"),
        worker_id=_id(body, "worker_id"),
        round=_count(body, "round", nullable=True),
        training=from_dict(TrainingConfig, _field(body, "training", (dict,)), "training."),
        model=_decode_model(_field(body, "model", (dict,))),
        issued_at=_time(body, "issued_at"),
    )


def _encode_update(update: Update) -> dict[str, Any]:
    return {
        "job_id": update.job_id,
        "update_id": update.update_id,
        "worker_id": update.worker_id,
        "task_id": update.task_id,
        "base_version": update.base_version,
        "round": update.round,
        "kind": update.kind,
        "num_samples": update.num_samples,
        "metrics": _finite_metrics(update.metrics, "update"),
        "sent_at": update.sent_at,
        "tensors": encode_tensors(update.tensors),
    }


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
        metrics=_metrics(body, "update"),
        sent_at=_time(body, "sent_at"),
        tensors=decode_tensors(_field(body, "tensors", (list,))),
    )


def _encode_hello(hello: Hello) -> dict[str, Any]:
    return {
        "worker_id": hello.worker_id,
        "num_samples": hello.num_samples,
        "device": hello.device,
        "sent_at": hello.sent_at,
    }


def _decode_hello(body: dict[str, Any]) -> Hello:
    return Hello(
        worker_id=_id(body, "worker_id"),
        num_samples=_count(body, "num_samples"),
        device=str(_field(body, "device", (str,)))[:64],
        sent_at=_time(body, "sent_at"),
    )


def _encode_cancel(cancel: Cancel) -> dict[str, Any]:
    return {"job_id": cancel.job_id, "sent_at": cancel.sent_at}


def _decode_cancel(body: dict[str, Any]) -> Cancel:
    return Cancel(job_id=_id(body, "job_id"), sent_at=_time(body, "sent_at"))


def _encode_failure(failure: Failure) -> dict[str, Any]:
    return {
        "worker_id": failure.worker_id,
        "job_id": failure.job_id,
        "task_id": failure.task_id,
        "reason": failure.reason,
        "detail": failure.detail,
        "sent_at": failure.sent_at,
    }


def _decode_failure(body: dict[str, Any]) -> Failure:
    reason = _field(body, "reason", (str,))
    if not REASON_PATTERN.match(reason):
        raise FieldError("field 'reason' must be a short code ([a-z][a-z0-9_], 1-32 chars)")
    return Failure(
        worker_id=_id(body, "worker_id"),
        job_id=_id(body, "job_id"),
        task_id=_id(body, "task_id"),
        reason=str(reason),
        detail=str(_field(body, "detail", (str,)))[:MAX_FAILURE_DETAIL],
        sent_at=_time(body, "sent_at"),
    )


# The types of protocol version 1. A hello, cancel or failure is a few hundred bytes and a job
# specification a few KiB; updates, tasks and models carry the model, so only the receiver's own
# bound (the aggregator's max_message_bytes) holds them.
_SMALL = 64 * 1024
MESSAGE_TYPES = MessageTypes()
MESSAGE_TYPES.register("job", Job, _encode_job, _decode_job, max_bytes=1 << 20)
MESSAGE_TYPES.register("model", GlobalModel, _encode_model, _decode_model)
MESSAGE_TYPES.register("task", Task, _encode_task, _decode_task)
MESSAGE_TYPES.register("update", Update, _encode_update, _decode_update)
MESSAGE_TYPES.register("hello", Hello, _encode_hello, _decode_hello, max_bytes=_SMALL)
MESSAGE_TYPES.register("cancel", Cancel, _encode_cancel, _decode_cancel, max_bytes=_SMALL)
MESSAGE_TYPES.register("failure", Failure, _encode_failure, _decode_failure, max_bytes=_SMALL)
# The largest encoding of each small message type, by `type` (docs/protocol.md section 2.1).
MAX_TYPE_BYTES = MESSAGE_TYPES.limits


def encode_message(message: Message) -> bytes:
    """Encode a message as a msgpack map with `protocol` and `type` first.

    The bytes are exactly msgpack.packb(..., use_bin_type=True) of that map; tensor data is
    spliced in with one join instead of being copied through msgpack's growing buffer.
    """
    return MESSAGE_TYPES.encode(message)


def decode_message(payload: bytes) -> Message:
    """Decode and validate a message; raise a ProtocolError subclass with a reason on bad input.

    The size limits of check_size hold before anything past them is built: the zero-copy reader
    keeps them as it reads, and a payload it leaves to msgpack is checked by check_size first.
    Tensors of a bytes payload are read-only views of it, so they keep the payload alive.
    """
    return cast(Message, MESSAGE_TYPES.decode(payload))


def _body(message: Message) -> tuple[str, dict[str, Any]]:
    """The wire name and field map encode_message packs (tests compare it with msgpack.packb)."""
    return MESSAGE_TYPES.body(message)
