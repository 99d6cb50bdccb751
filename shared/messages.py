"""Wire messages (job, task, model, update, hello, cancel, failure) and their msgpack codec."""

from __future__ import annotations

import math
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from shared.errors import (
    FieldError,
    MalformedMessageError,
    MessageTooLargeError,
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
# A failure's reason is a short code (data_mismatch, training_error, ...); its detail is text for
# people, cut to this many characters by the receiver.
REASON_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")
MAX_FAILURE_DETAIL = 1024
# Size limits kept while a message is decoded, stopping at the first count past one (docs/
# protocol.md section 2.1), so that what a message costs in memory is bounded by what it may
# hold, not by its sender. The largest encoding
# of each small message type; updates, tasks and models are bounded by the receiver's own limit.
MAX_TYPE_BYTES = {"hello": 64 * 1024, "cancel": 64 * 1024, "failure": 64 * 1024, "job": 1 << 20}
# Items of all maps and arrays of a message together (a map entry is two): an honest update of
# 10,000 tensors of 8 dims holds 170,000. Tiny items are what decoding amplifies (an empty map
# is one byte on the wire and 64 in Python).
MAX_MESSAGE_ITEMS = 250_000
# The bytes of a message other than its tensors' data: ids, names, shapes, metrics, a job
# specification (the data is read as views of the payload; everything else is copied).
MAX_NON_TENSOR_BYTES = 8 * 1024 * 1024


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


@dataclass(frozen=True)
class Cancel:
    """An operator asking the aggregator to end a job, running or queued (reason `cancelled`)."""

    job_id: str
    sent_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Failure:
    """A worker's report that it cannot train a task: a short stable reason and a detail."""

    worker_id: str
    job_id: str
    task_id: str
    reason: str
    detail: str
    sent_at: float = field(default_factory=time.time)


Message = Job | GlobalModel | Task | Update | Hello | Cancel | Failure


# ---------------------------------------------------------------- encoding


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


def _model_body(model: GlobalModel) -> dict[str, Any]:
    return {
        "job_id": model.job_id,
        "version": model.version,
        "model": to_dict(model.model),
        "metrics": _finite_metrics(model.metrics, "global model"),
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
            "metrics": _finite_metrics(message.metrics, "update"),
            "sent_at": message.sent_at,
            "tensors": encode_tensors(message.tensors),
        }
    if isinstance(message, Cancel):
        return "cancel", {"job_id": message.job_id, "sent_at": message.sent_at}
    if isinstance(message, Hello):
        return "hello", {
            "worker_id": message.worker_id,
            "num_samples": message.num_samples,
            "device": message.device,
            "sent_at": message.sent_at,
        }
    if isinstance(message, Failure):
        return "failure", _failure_body(message)
    raise TypeError(f"not a fedq message: {type(message).__name__}")


def _failure_body(failure: Failure) -> dict[str, Any]:
    return {
        "worker_id": failure.worker_id,
        "job_id": failure.job_id,
        "task_id": failure.task_id,
        "reason": failure.reason,
        "detail": failure.detail,
        "sent_at": failure.sent_at,
    }


def encode_message(message: Message) -> bytes:
    """Encode a message as a msgpack map with `protocol` and `type` first.

    The bytes are exactly msgpack.packb(..., use_bin_type=True) of that map; tensor data is
    spliced in with one join instead of being copied through msgpack's growing buffer.
    """
    kind, body = _body(message)
    parts: list[bytes | memoryview] = []
    _pack_into(
        {"protocol": PROTOCOL_VERSION, "type": kind} | body,
        parts,
        msgpack.Packer(use_bin_type=True, buf_size=4096),
    )
    return b"".join(parts)


_BYTES_LIKE = (bytes, bytearray, memoryview)
_SCALARS = (str, int, float, bool, type(None))


def _is_plain(value: Any) -> bool:
    """Whether value certainly holds no bin: a scalar or a list of scalars (a shape)."""
    kind = type(value)
    return kind in _SCALARS or (kind is list and all(type(v) in _SCALARS for v in value))


def _pack_into(obj: Any, parts: list[bytes | memoryview], packer: msgpack.Packer) -> None:
    """Append obj's msgpack bytes to parts, leaving bin payloads as references, not copies.

    Runs of plain items of a map or array are packed by msgpack in one call, as a map or array
    of their own whose header is then dropped, since msgpack packs items independently.
    """
    if isinstance(obj, _BYTES_LIKE):
        data = obj if type(obj) is memoryview else memoryview(obj)
        parts += (_bin_header(data.nbytes), data)
    elif type(obj) is dict:
        parts.append(_container_header(len(obj), 0x80, 0xDE))
        run: dict[Any, Any] = {}
        for key, value in obj.items():
            if _is_plain(value):
                run[key] = value
                continue
            _pack_run(run, parts, packer)
            run = {}
            parts.append(packer.pack(key))
            _pack_into(value, parts, packer)
        _pack_run(run, parts, packer)
    elif type(obj) is list:
        parts.append(_container_header(len(obj), 0x90, 0xDC))
        items: list[Any] = []
        for item in obj:
            if type(item) is dict and tuple(item) == _TENSOR_ENTRY_KEYS:
                _pack_run(items, parts, packer)
                items = []
                _pack_tensor_entry(item, parts, packer)
                continue
            if _is_plain(item):
                items.append(item)
                continue
            _pack_run(items, parts, packer)
            items = []
            _pack_into(item, parts, packer)
        _pack_run(items, parts, packer)
    else:
        parts.append(packer.pack(obj))


# A tensor entry as shared.tensors.encode_tensor makes it, keys in this order.
_TENSOR_ENTRY_KEYS = ("name", "dtype", "shape", "data")
_DATA_KEY = msgpack.packb("data")


def _pack_tensor_entry(
    entry: dict[str, Any], parts: list[bytes | memoryview], packer: msgpack.Packer
) -> None:
    """A tensor entry in one msgpack call for its three small fields, then its data by reference.

    The three fields packed as a map of three start with the fixmap byte 0x83; the entry is that
    map with "data" added, so its header is 0x84 and the rest is the same bytes.
    """
    data = entry["data"]
    if not isinstance(data, _BYTES_LIKE) or not _is_plain(entry["shape"]):
        _pack_into(entry, parts, packer)
        return
    small = packer.pack({"name": entry["name"], "dtype": entry["dtype"], "shape": entry["shape"]})
    view = data if type(data) is memoryview else memoryview(data)
    parts += (b"\x84", small[1:], _DATA_KEY, _bin_header(view.nbytes), view)


def _pack_run(
    run: dict[Any, Any] | list[Any], parts: list[bytes | memoryview], packer: msgpack.Packer
) -> None:
    if run:
        size = len(run)
        parts.append(packer.pack(run)[1 if size < 16 else 3 if size < 0x10000 else 5 :])


def _bin_header(size: int) -> bytes:
    # msgpack spec: bin 8 / bin 16 / bin 32, the length big-endian; packb picks the smallest.
    if size < 0x100:
        return bytes((0xC4, size))
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    if size <= 0xFFFFFFFF:
        return b"\xc6" + size.to_bytes(4, "big")
    raise ValueError(f"{size} bytes do not fit one msgpack bin")


def _container_header(size: int, fix: int, code16: int) -> bytes:
    # fixmap/fixarray up to 15 items, then map/array 16 (code16) and 32 (code16 + 1).
    if size < 16:
        return bytes((fix | size,))
    if size < 0x10000:
        return bytes((code16,)) + size.to_bytes(2, "big")
    return bytes((code16 + 1,)) + size.to_bytes(4, "big")


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
    if kind == "cancel":
        return Cancel(job_id=_id(body, "job_id"), sent_at=_time(body, "sent_at"))
    if kind == "hello":
        return Hello(
            worker_id=_id(body, "worker_id"),
            num_samples=_count(body, "num_samples"),
            device=str(_field(body, "device", (str,)))[:64],
            sent_at=_time(body, "sent_at"),
        )
    if kind == "failure":
        return _decode_failure(body)
    raise UnknownMessageTypeError(f"unknown message type {kind!r}")


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


class _Unusual(Exception):
    """Input the zero-copy reader leaves to msgpack; never escapes decode_message."""


# Nesting past this is left to msgpack's C code (after check_size), as is anything unusual.
_FAST_MAX_DEPTH = 16
_U8, _U16, _U32, _U64 = (struct.Struct(f">{c}") for c in "BHIQ")
_I8, _I16, _I32, _I64 = (struct.Struct(f">{c}") for c in "bhiq")
_F32, _F64 = struct.Struct(">f"), struct.Struct(">d")
_CONSTANTS = {0xC0: None, 0xC2: False, 0xC3: True}
# Type byte -> (struct of the length or value that follows, what it is).
_SIZED = {
    0xC4: (_U8, "bin"), 0xC5: (_U16, "bin"), 0xC6: (_U32, "bin"),
    0xCA: (_F32, "num"), 0xCB: (_F64, "num"),
    0xCC: (_U8, "num"), 0xCD: (_U16, "num"), 0xCE: (_U32, "num"), 0xCF: (_U64, "num"),
    0xD0: (_I8, "num"), 0xD1: (_I16, "num"), 0xD2: (_I32, "num"), 0xD3: (_I64, "num"),
    0xD9: (_U8, "str"), 0xDA: (_U16, "str"), 0xDB: (_U32, "str"),
    0xDC: (_U16, "array"), 0xDD: (_U32, "array"), 0xDE: (_U16, "map"), 0xDF: (_U32, "map"),
}  # fmt: skip


class _ZeroCopyReader:
    """Reads the msgpack of a message as msgpack.unpackb would, but tensor data as views.

    Only the `data` bins of the entries of a `tensors` list (of the message, or of a task's
    `model`) become read-only memoryviews of the payload; everything else is built as msgpack
    builds it. It keeps the size limits of check_size as it goes, stopping as soon as a count
    passes its limit, so it never builds more than they allow. Anything unusual (ext types,
    non-str keys, truncation, trailing bytes, invalid UTF-8, deep nesting) or past a limit raises
    _Unusual, and decode_message then checks the payload with check_size and reads it with
    msgpack, so errors and their reasons are those of check_size and msgpack. A payload this
    reader reads whole is one check_size passes: the same items, in the same order, are counted.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.view = memoryview(payload)
        self.pos = 0
        self.budget = MAX_MESSAGE_ITEMS
        self.data_bytes = 0  # of the tensor data read so far (views, not counted as copied)

    def message(self) -> dict[str, Any]:
        """Read the whole payload as one map."""
        body = self.value(0, "message")
        if (
            type(body) is not dict
            or self.pos != len(self.payload)
            or self.pos - self.data_bytes > MAX_NON_TENSOR_BYTES
        ):
            raise _Unusual
        return body

    def value(self, depth: int, role: str) -> Any:
        """Read the value at pos; role says where it sits: message, model, tensors, entry, data."""
        byte = self.payload[self.pos]
        self.pos += 1
        if byte <= 0x7F:
            return byte
        if byte >= 0xE0:
            return byte - 0x100
        if byte <= 0x8F:
            return self.map(byte & 0x0F, depth, role)
        if byte <= 0x9F:
            return self.array(byte & 0x0F, depth, role)
        if byte <= 0xBF:
            return self.text(byte & 0x1F)
        if byte in _CONSTANTS:
            return _CONSTANTS[byte]
        sized = _SIZED.get(byte)
        if sized is None:  # ext types and the never-used 0xc1
            raise _Unusual
        (number,) = sized[0].unpack_from(self.payload, self.pos)
        self.pos += sized[0].size
        if sized[1] == "num":
            return number
        if sized[1] == "str":
            return self.text(number)
        if sized[1] == "bin":
            return self.binary(number, role)
        if sized[1] == "array":
            return self.array(number, depth, role)
        return self.map(number, depth, role)

    def text(self, size: int) -> str:
        end = self.pos + size
        # pos - data_bytes only grows, so past the limit here is past it at the end too.
        if end > len(self.payload) or end - self.data_bytes > MAX_NON_TENSOR_BYTES:
            raise _Unusual
        text = self.payload[self.pos : end].decode("utf-8")
        self.pos = end
        return text

    def binary(self, size: int, role: str) -> bytes | memoryview:
        end = self.pos + size
        if end > len(self.payload):
            raise _Unusual
        self.pos, start = end, self.pos
        if role == "data":
            self.data_bytes += size
            return self.view[start:end]
        if end - self.data_bytes > MAX_NON_TENSOR_BYTES:
            raise _Unusual
        return self.payload[start:end]

    def array(self, size: int, depth: int, role: str) -> list[Any]:
        self.spend(size, depth)
        item_role = "entry" if role == "tensors" else ""
        return [self.value(depth + 1, item_role) for _ in range(size)]

    def map(self, size: int, depth: int, role: str) -> dict[str, Any]:
        self.spend(2 * size, depth)
        out: dict[str, Any] = {}
        for _ in range(size):
            key = self.value(depth + 1, "")
            if type(key) is not str:  # msgpack also allows bytes keys; leave those to it
                raise _Unusual
            value = self.value(depth + 1, _ROLES.get((role, key), ""))
            if role == "message" and key == "type" and type(value) is str:
                limit = MAX_TYPE_BYTES.get(value)
                if limit is not None and len(self.payload) > limit:
                    raise _Unusual
            out[key] = value
        return out

    def spend(self, items: int, depth: int) -> None:
        # Every item takes at least a byte, so a count past the bytes left is a lie.
        self.budget -= items
        if self.budget < 0 or depth >= _FAST_MAX_DEPTH or items > len(self.payload) - self.pos:
            raise _Unusual


_ROLES = {
    ("message", "tensors"): "tensors",
    ("message", "model"): "model",
    ("model", "tensors"): "tensors",
    ("entry", "data"): "data",
}


def _read_in_place(payload: bytes) -> dict[str, Any] | None:
    """Return the message map of payload, tensor data as views of it, if it is an ordinary message
    within the size limits; None if it is to be checked and read the slow way."""
    # Only immutable bytes are viewed: a view of a bytearray could change under the arrays.
    if type(payload) is not bytes:
        return None
    try:
        return _ZeroCopyReader(payload).message()
    except (_Unusual, IndexError, struct.error, UnicodeDecodeError):
        return None


def check_size(payload: bytes) -> None:
    """Raise MessageTooLargeError if the payload is over its type's size limit (MAX_TYPE_BYTES),
    holds more than MAX_MESSAGE_ITEMS items or more than MAX_NON_TENSOR_BYTES outside tensor data.

    Reads only msgpack headers, building nothing; other faults are left to the decoder, which
    stops at them too (so it builds no more than what was counted here).
    """
    skim = _Skim(payload)
    try:
        skim.value("message")
    except (_Unusual, IndexError, struct.error):
        return
    other = len(payload) - skim.data_bytes
    if other > MAX_NON_TENSOR_BYTES:
        raise MessageTooLargeError(
            f"{other} bytes outside tensor data exceed {MAX_NON_TENSOR_BYTES}"
        )


_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_EXT = {0xC7: _U8, 0xC8: _U16, 0xC9: _U32}
# The parts of a message whose layout check_size follows (the rest it skips in one loop).
_LAID_OUT = frozenset(("message", "model", "tensors", "entry"))


class _Skim:
    """Walks a msgpack message without building it: counts items, tensor data bytes, and checks
    the size limit of its `type` as soon as it is read."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.pos = 0
        self.items = MAX_MESSAGE_ITEMS
        self.data_bytes = 0

    def value(self, role: str) -> None:
        """Skip the value at pos; `role` as in _ZeroCopyReader (message, model, tensors, ...)."""
        if role not in _LAID_OUT:
            self.skip()
            return
        what, count = self.head()
        if what == "array":
            self.spend(count)
            for _ in range(count):
                self.value("entry" if role == "tensors" else "")
        elif what == "map":
            self.spend(2 * count)
            for _ in range(count):
                key = self.small()
                if role == "message" and key == "type":
                    self.check_type(self.small())
                elif role == "entry" and key == "data":
                    self.data()
                else:
                    self.value(_ROLES.get((role, key), "") if isinstance(key, str) else "")
        elif what == "bin":
            self.pos += count

    def data(self) -> None:
        start = self.pos
        what, count = self.head()
        if what == "bin":
            self.data_bytes += count
            self.pos += count
        else:
            self.pos = start
            self.skip()

    def check_type(self, kind: Any) -> None:
        limit = MAX_TYPE_BYTES.get(kind) if isinstance(kind, str) else None
        if limit is not None and len(self.payload) > limit:
            raise MessageTooLargeError(
                f"a {kind} of {len(self.payload)} bytes exceeds the {limit} bytes it may take"
            )

    def small(self) -> Any:
        """Skip a value and return it if it is short (a key, a type), else None."""
        start = self.pos
        self.skip()
        if self.pos - start > 64 or self.pos > len(self.payload):
            return None
        try:
            return msgpack.unpackb(self.payload[start : self.pos], raw=False)
        except Exception as e:  # invalid UTF-8 and the like: the decoder says what is wrong
            raise _Unusual from e

    def skip(self) -> None:
        """Skip one value, however nested, counting the items of its maps and arrays."""
        pending = 1
        while pending:
            pending -= 1
            what, count = self.head()
            if what == "bin":
                self.pos += count
            elif what != "scalar":
                items = 2 * count if what == "map" else count
                self.spend(items)
                pending += items

    def spend(self, items: int) -> None:
        # Every item takes a byte at least: a count past the bytes left is a lie for the decoder.
        if items > len(self.payload) - self.pos:
            raise _Unusual
        self.items -= items
        if self.items < 0:
            raise MessageTooLargeError(f"more than {MAX_MESSAGE_ITEMS} msgpack items")

    def head(self) -> tuple[str, int]:
        """Read the header at pos: ("map" or "array", items), ("bin", size) with pos at its
        bytes, or ("scalar", 0) with pos past the whole value (nil, bool, number, str, ext)."""
        payload = self.payload
        byte = payload[self.pos]
        self.pos += 1
        if byte <= 0x7F or byte >= 0xE0 or byte in _CONSTANTS:
            return "scalar", 0
        if byte <= 0x8F:
            return "map", byte & 0x0F
        if byte <= 0x9F:
            return "array", byte & 0x0F
        if byte <= 0xBF:
            self.pos += byte & 0x1F
            return "scalar", 0
        if byte in _FIXEXT:
            self.pos += 1 + _FIXEXT[byte]
            return "scalar", 0
        if byte in _EXT:
            (size,) = _EXT[byte].unpack_from(payload, self.pos)
            self.pos += _EXT[byte].size + 1 + size
            return "scalar", 0
        sized = _SIZED.get(byte)
        if sized is None:
            raise _Unusual
        (number,) = sized[0].unpack_from(payload, self.pos)
        self.pos += sized[0].size
        if sized[1] == "num":
            return "scalar", 0
        if sized[1] == "str":
            self.pos += number
            return "scalar", 0
        return sized[1], number


def decode_message(payload: bytes) -> Message:
    """Decode and validate a message; raise a ProtocolError subclass with a reason on bad input.

    The size limits of check_size hold before anything past them is built: the zero-copy reader
    keeps them as it reads, and a payload it leaves to msgpack is checked by check_size first.
    Tensors of a bytes payload are read-only views of it, so they keep the payload alive.
    """
    body: Any = _read_in_place(payload)
    if body is None:
        check_size(payload)
        try:
            body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
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
