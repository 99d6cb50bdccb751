"""Hostile and malformed updates built by hand, with the reason each must be rejected for.

Shared by the in-process and the RabbitMQ tiers (tests/integration/test_hostile_input.py,
tests/rabbitmq/test_rabbitmq_hostile_input.py): one FedAsync job on a small model, a sequence of
valid updates with one bad message of every kind between them, and what the dead queue must hold
afterwards. Bad messages are written with plain msgpack or by mutating a valid encoding, never
by the project's encoder alone, so that the codec's checks are what stops them. Updates answer
tasks issued under the tests' known task key (tests/known_task_key.py): an aggregator for these
cases is started on a state directory prepared with `use_known_key`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from known_task_key import task_id

from shared.chunks import split_payload
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig
from shared.messages import Job, Update, encode_message
from shared.models import build_model, state_to_numpy

MODEL = ModelSpec("mlp", (1, 8, 8), 10)
JOB_ID = "hostile-1"
WORKER = "w0"
# Valid updates come from three sites in turn: the norm bound takes what is normal from the
# workers' latest norms once three workers sent some (docs/reliability.md, "The norm bound").
WORKERS = (WORKER, "w1", "w2")
VALID_UPDATES = 6
NORM_RATIO = 10.0
# Chunk sets are cut this small by hand; the aggregator takes messages up to this size.
CHUNK_SIZE = 64 * 1024
MAX_MESSAGE_BYTES = 1024 * 1024
INITIAL = state_to_numpy(build_model(MODEL, seed=0))


def job() -> Job:
    """The job: FedAsync with a norm bound, one version per valid update, no evaluation between."""
    spec = JobSpec(
        name="hostile",
        model=MODEL,
        dataset="digits",
        strategy=StrategyConfig(name="fedasync", max_update_norm_ratio=NORM_RATIO),
        stop=StopConfig(max_versions=VALID_UPDATES),
        eval_every=1000,
    )
    return Job(JOB_ID, spec, submitted_at=0.0)


@dataclass(frozen=True)
class Case:
    """One message of the sequence: the bodies published, and those it must dead-letter."""

    name: str
    reason: str  # "" for a valid update
    parts: tuple[bytes, ...]
    dead: tuple[bytes, ...] = ()

    @property
    def valid(self) -> bool:
        """Whether this is a valid update that must be folded in."""
        return not self.reason


def _update(
    update_id: str,
    base: int,
    scale: float = 0.01,
    seed: int = 0,
    worker: str = WORKER,
    **fields: Any,
) -> Update:
    """Weights near the initial model: small noise on every floating-point tensor; answering a
    task issued for its worker and base version (one task per update id)."""
    rng = np.random.default_rng(seed)
    tensors = {
        name: (a + rng.normal(0.0, scale, a.shape)).astype(a.dtype) if a.dtype.kind == "f" else a
        for name, a in INITIAL.items()
    }
    values: dict[str, Any] = {
        "job_id": JOB_ID,
        "update_id": update_id,
        "worker_id": worker,
        "task_id": "",
        "base_version": base,
        "round": None,
        "kind": "weights",
        "num_samples": 100 + seed,
        "tensors": tensors,
        "metrics": {"loss": 1.0},
        "sent_at": 0.0,
    }
    values |= fields
    if not values["task_id"]:
        nonce = hashlib.md5(update_id.encode()).hexdigest()  # 32 hex digits, fixed per update
        values["task_id"] = task_id(JOB_ID, values["worker_id"], values["base_version"], nonce)
    return Update(**values)


def _body(update: Update) -> dict[str, Any]:
    unpacked: dict[str, Any] = msgpack.unpackb(encode_message(update), raw=False)
    return unpacked


def _pack(body: Any) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def _whole(name: str, reason: str, payload: bytes) -> Case:
    return Case(name, reason, (payload,), (payload,))


def _mutated(name: str, reason: str, change: Any, **fields: Any) -> Case:
    """A bad update: the encoding of an otherwise valid one, changed by `change(body)`."""
    body = _body(_update(f"bad-{name.replace('_', '-')}", 0, seed=50, **fields))
    change(body)
    return _whole(name, reason, _pack(body))


def _encoded(name: str, reason: str, **fields: Any) -> Case:
    """A bad update the encoder can write (wrong dtype, NaN, future base, ...)."""
    payload = encode_message(_update(f"bad-{name.replace('_', '-')}", 0, seed=50, **fields))
    return _whole(name, reason, payload)


def _tensor(body: dict[str, Any], index: int = 0) -> dict[str, Any]:
    entry: dict[str, Any] = body["tensors"][index]
    return entry


def _with_value(value: float) -> dict[str, np.ndarray]:
    tensors = dict(_update("x", 0).tensors)
    first = next(iter(tensors))
    poisoned = tensors[first].copy()
    poisoned.flat[7] = value
    return tensors | {first: poisoned}


def _float64() -> dict[str, np.ndarray]:
    tensors = dict(_update("x", 0).tensors)
    first = next(iter(tensors))
    return tensors | {first: tensors[first].astype(np.float64)}


def _tampered_chunks(payload: bytes) -> tuple[bytes, ...]:
    parts = split_payload(payload, CHUNK_SIZE)
    envelope = msgpack.unpackb(parts[1], raw=False)
    data = bytearray(envelope["data"])
    data[100] ^= 0xFF
    envelope["data"] = bytes(data)
    return (parts[0], _pack(envelope), *parts[2:])


def _decode_failures() -> list[Case]:
    truncated = encode_message(_update("bad-truncated", 0))
    return [
        _whole("not_msgpack", "malformed", b"\xc1 these bytes are not msgpack"),
        _whole("truncated", "malformed", truncated[: len(truncated) // 2]),
        _mutated("protocol_version", "protocol_version", lambda b: b.update(protocol=2)),
    ]


def _field_failures() -> list[Case]:
    return [
        _mutated("unknown_type", "unknown_type", lambda b: b.update(type="gossip")),
        _mutated("missing_field", "missing_field", lambda b: b.pop("num_samples")),
        _mutated("wrongly_typed_field", "bad_field", lambda b: b.update(base_version="0")),
        _encoded("unknown_job", "unknown_job", job_id="another-job"),
    ]


def _tensor_failures() -> list[Case]:
    extra = {"name": "extra.weight", "dtype": "float32", "shape": [2], "data": bytes(8)}
    return [
        _mutated("missing_tensor", "bad_names", lambda b: b["tensors"].pop()),
        _mutated("extra_tensor", "bad_names", lambda b: b["tensors"].append(extra)),
        _mutated("wrong_shape", "bad_shape", lambda b: _tensor(b)["shape"].reverse()),
        _mutated("object_dtype", "bad_dtype", lambda b: _tensor(b).update(dtype="object")),
        _mutated("numpy_object_dtype", "bad_dtype", lambda b: _tensor(b).update(dtype="O")),
    ]


def _shorten(body: dict[str, Any]) -> None:
    entry = _tensor(body)
    entry["data"] = entry["data"][:-4]


def _value_failures() -> list[Case]:
    return [
        _encoded("float64_tensor", "bad_dtype", tensors=_float64()),
        _mutated("data_length", "bad_length", _shorten),
        _encoded("nan", "not_finite", tensors=_with_value(float("nan"))),
        _encoded("inf", "not_finite", tensors=_with_value(float("-inf"))),
        _mutated("zero_samples", "bad_num_samples", lambda b: b.update(num_samples=0)),
        _mutated("negative_samples", "bad_num_samples", lambda b: b.update(num_samples=-5)),
        _mutated("absurd_samples", "bad_num_samples", lambda b: b.update(num_samples=10**12)),
        _encoded("future_base_version", "future_version", base_version=99),
    ]


def _task_failures() -> list[Case]:
    """Updates that answer no task of theirs, or a task already answered (after valid 3)."""
    replayed = _body(_update("valid-3", 3, seed=3)) | {"update_id": "bad-replayed"}
    return [
        _encoded("task_never_issued", "unknown_task", task_id="task-made-up"),
        _encoded("task_of_another_version", "unknown_task", task_id=task_id(JOB_ID, WORKER, 1)),
        _whole("replayed_under_a_new_update_id", "task_used", _pack(replayed)),
    ]


def _size_failures() -> list[Case]:
    far = encode_message(_update("bad-norm", 4, scale=1.0, seed=51))
    # Unknown keys are ignored: without its size this update would be accepted.
    padded = _body(_update("bad-too-large", 4, seed=52)) | {"padding": bytes(MAX_MESSAGE_BYTES)}
    tampered = _tampered_chunks(encode_message(_update("bad-checksum", 4, seed=53)))
    withheld = split_payload(encode_message(_update("bad-incomplete", 4, seed=54)), CHUNK_SIZE)
    return [
        _whole("norm_far_beyond_the_others", "norm_too_large", far),
        _whole("oversized", "too_large", _pack(padded)),
        Case("chunk_checksum", "bad_chunk", tampered, tampered),
        Case("incomplete_chunks", "incomplete_chunks", tuple(withheld[:-1]), tuple(withheld[:-1])),
    ]


def valid(k: int, chunked: bool = False) -> Case:
    """Valid update k, based on version k (each one makes a version under FedAsync)."""
    payload = encode_message(_update(f"valid-{k}", k, seed=k, worker=WORKERS[k % len(WORKERS)]))
    parts = split_payload(payload, CHUNK_SIZE) if chunked else [payload]
    return Case(f"valid_{k}", "", tuple(parts))


def sequence() -> list[Case]:
    """Valid updates 0-5 in order, every kind of bad message between them."""
    duplicate = encode_message(_update("valid-2", 2, seed=2))
    return [
        valid(0),
        *_decode_failures(),
        valid(1),
        *_field_failures(),
        valid(2, chunked=True),  # a valid chunk set goes through
        _whole("duplicate_update_id", "duplicate", duplicate),
        *_tensor_failures(),
        valid(3),
        *_task_failures(),
        *_value_failures(),
        valid(4),
        *_size_failures(),
        valid(5),
    ]


def dead_letters(cases: list[Case]) -> Counter[tuple[str, bytes]]:
    """The (reason, body) of every message the cases must put on the dead queue."""
    return Counter((case.reason, body) for case in cases for body in case.dead)


def rejected_reasons(cases: list[Case]) -> Counter[str]:
    """How many rejections of each reason the aggregator must count (a chunk set counts once)."""
    return Counter(case.reason for case in cases if not case.valid)
