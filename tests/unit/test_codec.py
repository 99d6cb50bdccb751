"""Tests of the message codec: round trips of every message type, and every validation failure."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.errors import (
    FieldError,
    MalformedMessageError,
    ProtocolError,
    TensorError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
)
from shared.jobs import (
    OPTIMIZERS,
    STALENESS_FUNCTIONS,
    STRATEGIES,
    UPDATE_KINDS,
    JobSpec,
    ModelSpec,
    StopConfig,
    StrategyConfig,
    TrainingConfig,
)
from shared.messages import (
    ID_PATTERN,
    MAX_METRICS,
    MAX_NUM_SAMPLES,
    Cancel,
    GlobalModel,
    Hello,
    Job,
    Message,
    Task,
    Update,
    decode_message,
    encode_message,
)
from shared.tensors import (
    MAX_DIMS,
    MAX_NAME_LENGTH,
    MAX_TENSORS,
    WIRE_DTYPES,
    Tensors,
    check_finite,
    check_like,
    decode_tensors,
    encode_tensor,
    encode_tensors,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ strategies

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", fullmatch=True)
counts = st.integers(0, 2**64 - 1)
timestamps = st.floats(allow_nan=False, allow_infinity=False)
metric_values = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**63), 2**64 - 1)
metrics = st.dictionaries(st.text(min_size=1, max_size=16), metric_values, max_size=MAX_METRICS)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(sorted(WIRE_DTYPES.values(), key=str)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def tensor_dicts(draw: st.DrawFn) -> Tensors:
    names = draw(st.lists(st.text(min_size=1, max_size=24), max_size=6, unique=True))
    return {name: draw(arrays()) for name in names}


model_specs = st.builds(
    ModelSpec,
    name=st.text(min_size=1, max_size=12),
    input_shape=st.lists(st.integers(1, 64), min_size=1, max_size=4).map(tuple),
    num_classes=st.integers(1, 1000),
)
training_configs = st.builds(
    TrainingConfig,
    epochs=st.integers(1, 50),
    batch_size=st.integers(1, 4096),
    optimizer=st.sampled_from(OPTIMIZERS),
    lr=st.floats(1e-6, 10.0),
    momentum=st.floats(0.0, 1.0),
    weight_decay=st.floats(0.0, 1.0),
    mu=st.floats(0.0, 10.0),
    send=st.sampled_from(UPDATE_KINDS),
    max_batches=st.integers(0, 10_000),
)
strategy_configs = st.builds(
    StrategyConfig,
    name=st.sampled_from(STRATEGIES),
    fraction=st.floats(0.01, 1.0),
    min_updates=st.integers(0, 100),
    buffer_size=st.integers(1, 100),
    alpha=st.floats(0.01, 1.0),
    staleness=st.sampled_from(STALENESS_FUNCTIONS),
    max_staleness=st.none() | st.integers(0, 100),
)
stop_configs = st.builds(
    StopConfig,
    max_versions=st.integers(1, 10_000),
    target_accuracy=st.none() | st.floats(0.01, 1.0),
    max_time_s=st.none() | st.floats(1.0, 1e6),
)
job_specs = st.builds(
    JobSpec,
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True),
    model=model_specs,
    dataset=st.text(max_size=20),
    strategy=strategy_configs,
    training=training_configs,
    stop=stop_configs,
    seed=st.integers(0, 2**32),
    eval_every=st.integers(1, 100),
)
global_models = st.builds(
    GlobalModel,
    job_id=ids,
    version=counts,
    model=model_specs,
    tensors=tensor_dicts(),
    metrics=metrics,
)
updates = st.builds(
    Update,
    job_id=ids,
    update_id=ids,
    worker_id=ids,
    task_id=ids,
    base_version=counts,
    round=st.none() | counts,
    kind=st.sampled_from(UPDATE_KINDS),
    num_samples=st.integers(1, MAX_NUM_SAMPLES),
    tensors=tensor_dicts(),
    metrics=metrics,
    sent_at=timestamps,
)
tasks = st.builds(
    Task,
    job_id=ids,
    task_id=ids,
    worker_id=ids,
    round=st.none() | counts,
    training=training_configs,
    model=global_models,
    issued_at=timestamps,
)
hellos = st.builds(
    Hello,
    worker_id=ids,
    num_samples=counts,
    device=st.text(max_size=64),
    sent_at=timestamps,
)
jobs = st.builds(Job, job_id=ids, spec=job_specs, submitted_at=timestamps)

# ------------------------------------------------------------------ helpers


def assert_same_tensors(decoded: Tensors, original: Tensors) -> None:
    assert list(decoded) == list(original)
    for name, array in original.items():
        got = decoded[name]
        assert got.dtype == array.dtype
        assert got.shape == array.shape
        assert got.tobytes() == np.ascontiguousarray(array).tobytes()


def without_tensors(message: Any) -> Any:
    """The message with its tensors (and a task's model tensors) removed, for == comparison."""
    if isinstance(message, Task):
        return dataclasses.replace(message, model=without_tensors(message.model))
    if isinstance(message, GlobalModel | Update):
        return dataclasses.replace(message, tensors={}, metrics={})
    return message


def normalised_metrics(values: dict[str, float]) -> dict[str, float]:
    return {key: float(value) for key, value in values.items()}


def round_trip(message: Message) -> Message:
    return decode_message(encode_message(message))


def sample_update(**changes: Any) -> Update:
    fields: dict[str, Any] = {
        "job_id": "job-1",
        "update_id": "5f0c2a7e9b1d4e6f8a3b2c1d0e9f8a7b",
        "worker_id": "w1",
        "task_id": "t7",
        "base_version": 3,
        "round": 3,
        "kind": "weights",
        "num_samples": 600,
        "tensors": {
            "fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
            "fc.bias": np.array([0.5, -1.0], dtype=np.float32),
            "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        },
        "metrics": {"loss": 0.5},
        "sent_at": 1_700_000_000.0,
    }
    return Update(**(fields | changes))


def update_body(**changes: Any) -> dict[str, Any]:
    """A valid update as a plain map, with some fields replaced."""
    body: dict[str, Any] = msgpack.unpackb(encode_message(sample_update()))
    return body | changes


def pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def tensor_entry(**changes: Any) -> dict[str, Any]:
    entry = {"name": "w", "dtype": "float32", "shape": [2], "data": bytes(8)}
    return entry | changes


def update_with_entries(entries: list[Any]) -> bytes:
    return pack(update_body(tensors=entries))


def expect(error: type[ProtocolError], reason: str, payload: bytes) -> None:
    with pytest.raises(error) as caught:
        decode_message(payload)
    assert type(caught.value) is error
    assert caught.value.reason == reason


# ------------------------------------------------------------------ round trips


@FAST
@given(update=updates)
def test_an_update_survives_a_round_trip_with_every_field_and_exact_tensor_bytes(
    update: Update,
) -> None:
    decoded = round_trip(update)

    assert isinstance(decoded, Update)
    assert without_tensors(decoded) == without_tensors(update)
    assert decoded.metrics == normalised_metrics(update.metrics)
    assert_same_tensors(decoded.tensors, update.tensors)


@FAST
@given(task=tasks)
def test_a_task_survives_a_round_trip_with_its_training_config_and_model(task: Task) -> None:
    decoded = round_trip(task)

    assert isinstance(decoded, Task)
    assert without_tensors(decoded) == without_tensors(task)
    assert decoded.model.metrics == normalised_metrics(task.model.metrics)
    assert_same_tensors(decoded.model.tensors, task.model.tensors)


@FAST
@given(model=global_models)
def test_a_global_model_survives_a_round_trip(model: GlobalModel) -> None:
    decoded = round_trip(model)

    assert isinstance(decoded, GlobalModel)
    assert without_tensors(decoded) == without_tensors(model)
    assert decoded.metrics == normalised_metrics(model.metrics)
    assert_same_tensors(decoded.tensors, model.tensors)


@FAST
@given(hello=hellos)
def test_a_hello_survives_a_round_trip(hello: Hello) -> None:
    assert round_trip(hello) == hello


@FAST
@given(job=jobs)
def test_a_job_survives_a_round_trip_with_its_whole_spec(job: Job) -> None:
    assert round_trip(job) == job


@settings(max_examples=100, deadline=None)
@given(tensors=tensor_dicts())
def test_tensors_keep_order_names_dtype_shape_and_bytes(tensors: Tensors) -> None:
    decoded = decode_tensors(msgpack.unpackb(pack(encode_tensors(tensors))))

    assert_same_tensors(decoded, tensors)


@given(ident=ids)
def test_the_test_id_strategy_only_draws_ids_the_codec_accepts(ident: str) -> None:
    assert ID_PATTERN.match(ident)


def test_a_scalar_tensor_keeps_its_empty_shape() -> None:
    scalar = np.array(7, dtype=np.int64)

    entry = encode_tensor("n", scalar)

    assert entry["shape"] == []
    assert bytes(entry["data"]) == (7).to_bytes(8, "little")


def test_a_zero_size_tensor_is_sent_with_empty_data() -> None:
    entry = encode_tensor("empty", np.zeros((3, 0), dtype=np.float32))

    assert entry["shape"] == [3, 0]
    assert entry["data"] == b""


def test_a_big_endian_array_is_sent_little_endian() -> None:
    array = np.array([1.0, -2.0], dtype=">f4")

    entry = encode_tensor("w", array)

    assert entry["dtype"] == "float32"
    assert bytes(entry["data"]) == np.array([1.0, -2.0], dtype="<f4").tobytes()


def test_a_fortran_ordered_array_is_sent_in_c_order() -> None:
    array = np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3))

    entry = encode_tensor("w", array)

    assert bytes(entry["data"]) == bytes(np.arange(6, dtype="<i4").tobytes())


@pytest.mark.parametrize("dtype", ["complex64", "uint16", "uint64", "U3", "O", "V4"])
def test_an_array_of_a_dtype_outside_the_allowlist_cannot_be_encoded(dtype: str) -> None:
    array = np.zeros(2, dtype=dtype)

    with pytest.raises(TensorError) as caught:
        encode_tensor("w", array)

    assert caught.value.reason == "bad_dtype"


def test_a_decoded_array_is_read_only_so_that_the_wire_buffer_is_never_written() -> None:
    decoded = round_trip(sample_update())

    assert isinstance(decoded, Update)
    assert not decoded.tensors["fc.weight"].flags.writeable


def test_an_update_with_a_null_round_decodes_with_round_none() -> None:
    decoded = round_trip(sample_update(round=None))

    assert isinstance(decoded, Update)
    assert decoded.round is None


def test_a_hello_device_is_cut_to_64_characters() -> None:
    hello = Hello("w1", 10, "x" * 100, sent_at=1.0)

    decoded = round_trip(hello)

    assert isinstance(decoded, Hello)
    assert decoded.device == "x" * 64


def test_a_cancel_survives_a_round_trip() -> None:
    cancel = Cancel("mnist-fedbuff-1a2b3c4d", sent_at=12.5)

    assert round_trip(cancel) == cancel


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"job_id": "a job", "sent_at": 1.0}, "bad_field"),
        ({"job_id": "j", "sent_at": float("nan")}, "bad_field"),
        ({"sent_at": 1.0}, "missing_field"),
        ({"job_id": "j"}, "missing_field"),
    ],
)
def test_a_bad_cancel_is_rejected_with_its_reason(body: dict[str, Any], reason: str) -> None:
    payload = msgpack.packb({"protocol": 1, "type": "cancel"} | body)

    with pytest.raises(ProtocolError) as caught:
        decode_message(payload)

    assert caught.value.reason == reason


def test_a_job_spec_accepts_an_int_where_a_float_is_expected() -> None:
    body = {"protocol": 1, "type": "job", "job_id": "j", "submitted_at": 1}
    body["spec"] = {"training": {"lr": 1}}

    decoded = decode_message(pack(body))

    assert isinstance(decoded, Job)
    assert decoded.spec.training.lr == 1.0
    assert type(decoded.spec.training.lr) is float


# ------------------------------------------------------------------ envelope failures


def test_bytes_that_are_not_msgpack_are_malformed() -> None:
    expect(MalformedMessageError, "malformed", b"\xc1")


def test_a_truncated_message_is_malformed() -> None:
    expect(MalformedMessageError, "malformed", encode_message(sample_update())[:-3])


def test_trailing_bytes_after_the_message_are_malformed() -> None:
    expect(MalformedMessageError, "malformed", encode_message(sample_update()) + b"\x00")


def test_invalid_utf8_in_a_string_is_malformed() -> None:
    expect(MalformedMessageError, "malformed", b"\x81\xa1\xff\x01")


@pytest.mark.parametrize("value", [[1, 2], "update", 1, None, b"\x00"])
def test_a_msgpack_value_that_is_not_a_map_is_malformed(value: Any) -> None:
    expect(MalformedMessageError, "malformed", pack(value))


def test_a_message_without_protocol_is_malformed() -> None:
    body = update_body()
    del body["protocol"]

    expect(MalformedMessageError, "malformed", pack(body))


@pytest.mark.parametrize("value", ["1", True, 1.0, None])
def test_a_protocol_that_is_not_an_int_is_malformed(value: Any) -> None:
    expect(MalformedMessageError, "malformed", pack(update_body(protocol=value)))


@pytest.mark.parametrize("version", [0, 2, -1, 2**64 - 1])
def test_another_protocol_version_is_unsupported(version: int) -> None:
    expect(UnsupportedVersionError, "protocol_version", pack(update_body(protocol=version)))


def test_a_message_without_type_is_malformed() -> None:
    body = update_body()
    del body["type"]

    expect(MalformedMessageError, "malformed", pack(body))


def test_a_type_that_is_not_a_string_is_malformed() -> None:
    expect(MalformedMessageError, "malformed", pack(update_body(type=3)))


@pytest.mark.parametrize("kind", ["gossip", "chunk", "Update", ""])
def test_an_unknown_type_is_rejected(kind: str) -> None:
    expect(UnknownMessageTypeError, "unknown_type", pack(update_body(type=kind)))


# ------------------------------------------------------------------ field failures

UPDATE_FIELDS = [
    "job_id",
    "update_id",
    "worker_id",
    "task_id",
    "base_version",
    "round",
    "kind",
    "num_samples",
    "metrics",
    "sent_at",
    "tensors",
]


@pytest.mark.parametrize("field", UPDATE_FIELDS)
def test_an_update_missing_a_required_field_is_rejected(field: str) -> None:
    body = update_body()
    del body[field]

    expect(FieldError, "missing_field", pack(body))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("base_version", "3"),
        ("base_version", True),
        ("base_version", 3.0),
        ("base_version", None),
        ("num_samples", "600"),
        ("num_samples", True),
        ("num_samples", 600.0),
        ("round", "3"),
        ("round", False),
        ("round", 3.0),
        ("job_id", 5),
        ("job_id", b"job-1"),
        ("job_id", None),
        ("kind", 1),
        ("kind", "gradient"),
        ("sent_at", "now"),
        ("sent_at", True),
        ("sent_at", None),
        ("sent_at", float("nan")),
        ("sent_at", float("inf")),
        ("metrics", []),
        ("metrics", {"loss": "low"}),
        ("metrics", {"loss": True}),
        ("metrics", {"loss": None}),
        ("metrics", {f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}),
        ("metrics", {"": 1.0}),
        ("metrics", {"x" * 65: 1.0}),
        ("tensors", {}),
        ("tensors", None),
        ("base_version", -1),
        ("round", -1),
    ],
)
def test_an_update_field_of_the_wrong_type_or_value_is_a_bad_field(field: str, value: Any) -> None:
    expect(FieldError, "bad_field", pack(update_body(**{field: value})))


@pytest.mark.parametrize(
    "bad_id", ["", "-leading", ".dot", "a b", "a/b", "é", "x" * 129, "abc\n", "a\x00"]
)
@pytest.mark.parametrize("field", ["job_id", "update_id", "worker_id", "task_id"])
def test_an_id_outside_the_pattern_is_a_bad_field(field: str, bad_id: str) -> None:
    expect(FieldError, "bad_field", pack(update_body(**{field: bad_id})))


def test_an_id_of_128_characters_is_accepted() -> None:
    decoded = decode_message(pack(update_body(update_id="a" * 128)))

    assert isinstance(decoded, Update)
    assert decoded.update_id == "a" * 128


@pytest.mark.parametrize("num_samples", [0, -1, MAX_NUM_SAMPLES + 1, 2**64 - 1])
def test_num_samples_outside_one_to_a_billion_is_rejected(num_samples: int) -> None:
    expect(FieldError, "bad_num_samples", pack(update_body(num_samples=num_samples)))


@pytest.mark.parametrize("num_samples", [1, MAX_NUM_SAMPLES])
def test_num_samples_at_the_bounds_is_accepted(num_samples: int) -> None:
    decoded = decode_message(pack(update_body(num_samples=num_samples)))

    assert isinstance(decoded, Update)
    assert decoded.num_samples == num_samples


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_metric_that_is_not_finite_is_rejected_as_not_finite(value: float) -> None:
    expect(FieldError, "not_finite", pack(update_body(metrics={"loss": value})))


def test_a_metrics_map_of_exactly_64_entries_is_accepted() -> None:
    full = {f"m{i}": float(i) for i in range(MAX_METRICS)}

    decoded = decode_message(pack(update_body(metrics=full)))

    assert isinstance(decoded, Update)
    assert decoded.metrics == full


def test_a_task_with_an_unknown_training_key_is_a_bad_field() -> None:
    body = msgpack.unpackb(encode_message(sample_task()))
    body["training"]["learning_rate"] = 0.1

    expect(FieldError, "bad_field", pack(body))


def test_a_task_whose_model_is_not_a_map_is_a_bad_field() -> None:
    body = msgpack.unpackb(encode_message(sample_task()))
    body["model"] = [1, 2]

    expect(FieldError, "bad_field", pack(body))


@pytest.mark.parametrize(
    "spec",
    [
        {"training": {"lr": 0}},
        {"training": {"epochs": True}},
        {"strategy": {"name": "fedsgd"}},
        {"stop": {"max_versions": None, "max_time_s": None}},
        {"model": {"input_shape": [1, "28"]}},
        {"colour": "blue"},
        [],
    ],
)
def test_a_job_with_an_invalid_spec_is_a_bad_field(spec: Any) -> None:
    body = {"protocol": 1, "type": "job", "job_id": "j", "spec": spec, "submitted_at": 1.0}

    expect(FieldError, "bad_field", pack(body))


def sample_task() -> Task:
    update = sample_update()
    model = GlobalModel(
        "job-1", 3, ModelSpec("cnn", (1, 28, 28), 10), update.tensors, {"accuracy": 0.9}
    )
    return Task("job-1", "t7", "w1", 3, TrainingConfig(), model, issued_at=1.0)


# ------------------------------------------------------------------ tensor failures


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (tensor_entry(dtype="complex64"), "bad_dtype"),
        (tensor_entry(dtype="O"), "bad_dtype"),
        (tensor_entry(dtype="uint16"), "bad_dtype"),
        (tensor_entry(dtype="<f4"), "bad_dtype"),
        (tensor_entry(dtype=4), "bad_dtype"),
        (tensor_entry(shape="2"), "bad_tensor"),
        (tensor_entry(shape={"0": 2}), "bad_tensor"),
        (tensor_entry(shape=2), "bad_tensor"),
        (tensor_entry(shape=[-2]), "bad_tensor"),
        (tensor_entry(shape=[2, -1], data=b""), "bad_tensor"),
        (tensor_entry(shape=[True, 2]), "bad_tensor"),
        (tensor_entry(shape=[2.0]), "bad_tensor"),
        (tensor_entry(shape=[1] * (MAX_DIMS + 1), data=bytes(4)), "bad_tensor"),
        (tensor_entry(shape=[0, 2**62, 2**62], data=b""), "bad_tensor"),
        (tensor_entry(data=bytes(7)), "bad_length"),
        (tensor_entry(data=bytes(12)), "bad_length"),
        (tensor_entry(shape=[], data=b""), "bad_length"),
        (tensor_entry(data="\x00" * 8), "bad_tensor"),
        (tensor_entry(name=""), "bad_tensor"),
        (tensor_entry(name="n" * (MAX_NAME_LENGTH + 1)), "bad_tensor"),
        (tensor_entry(name=5), "bad_tensor"),
        ({"name": "w", "dtype": "float32", "shape": [2]}, "bad_tensor"),
        ([b"w", "float32", [2], bytes(8)], "bad_tensor"),
    ],
)
def test_a_bad_tensor_entry_is_rejected_with_its_reason(entry: Any, reason: str) -> None:
    expect(TensorError, reason, update_with_entries([entry]))


def test_two_tensors_with_one_name_are_rejected() -> None:
    entries = [tensor_entry(), tensor_entry()]

    expect(TensorError, "duplicate_tensor", update_with_entries(entries))


def test_more_tensors_than_the_limit_are_rejected() -> None:
    entries = [tensor_entry(name=f"t{i}", shape=[0], data=b"") for i in range(MAX_TENSORS + 1)]

    expect(TensorError, "bad_tensor", update_with_entries(entries))


def test_a_tensor_name_of_256_characters_and_eight_dims_is_accepted() -> None:
    entry = tensor_entry(name="n" * MAX_NAME_LENGTH, shape=[1] * MAX_DIMS, data=bytes(4))

    decoded = decode_message(update_with_entries([entry]))

    assert isinstance(decoded, Update)
    assert decoded.tensors["n" * MAX_NAME_LENGTH].shape == (1,) * MAX_DIMS


# ------------------------------------------------------------------ check_like, check_finite


def reference_tensors() -> Tensors:
    return {
        "a": np.zeros((2, 3), dtype=np.float32),
        "b": np.zeros(4, dtype=np.float32),
        "n": np.array(0, dtype=np.int64),
    }


def expect_unlike(tensors: Tensors, reason: str) -> None:
    with pytest.raises(TensorError) as caught:
        check_like(tensors, reference_tensors())
    assert caught.value.reason == reason


def test_tensors_like_the_reference_pass_check_like() -> None:
    decoded = decode_tensors(msgpack.unpackb(pack(encode_tensors(reference_tensors()))))

    assert check_like(decoded, reference_tensors()) is None


def test_a_missing_tensor_fails_check_like_with_bad_names() -> None:
    tensors = reference_tensors()
    del tensors["b"]

    expect_unlike(tensors, "bad_names")


def test_an_extra_tensor_fails_check_like_with_bad_names() -> None:
    tensors = reference_tensors() | {"extra": np.zeros(1, dtype=np.float32)}

    expect_unlike(tensors, "bad_names")


def test_tensors_in_another_order_fail_check_like_with_bad_names() -> None:
    ref = reference_tensors()
    tensors = {"b": ref["b"], "a": ref["a"], "n": ref["n"]}

    expect_unlike(tensors, "bad_names")


def test_a_tensor_of_another_shape_fails_check_like_with_bad_shape() -> None:
    tensors = reference_tensors() | {"a": np.zeros((3, 2), dtype=np.float32)}

    expect_unlike(tensors, "bad_shape")


def test_a_tensor_of_another_dtype_fails_check_like_with_bad_dtype() -> None:
    tensors = reference_tensors() | {"a": np.zeros((2, 3), dtype=np.float64)}

    expect_unlike(tensors, "bad_dtype")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nan_or_inf_fails_check_finite(dtype: Any, bad: float) -> None:
    tensors = {"ok": np.ones(3, dtype=np.float32), "w": np.array([1.0, bad], dtype=dtype)}

    with pytest.raises(TensorError) as caught:
        check_finite(tensors)

    assert caught.value.reason == "not_finite"


def test_finite_floats_and_integer_tensors_pass_check_finite() -> None:
    tensors = {"w": np.array([1.0, -2.0], dtype=np.float32), "n": np.array([2**62], np.int64)}

    assert check_finite(tensors) is None


def test_check_finite_runs_on_decoded_read_only_arrays() -> None:
    bad = sample_update(tensors={"w": np.array([np.nan], dtype=np.float32)})
    decoded = round_trip(bad)
    assert isinstance(decoded, Update)

    with pytest.raises(TensorError) as caught:
        check_finite(decoded.tensors)

    assert caught.value.reason == "not_finite"


# ------------------------------------------------------------------ fuzzing

VALID_PAYLOADS = [
    encode_message(sample_update()),
    encode_message(sample_update(round=None, kind="delta", metrics={})),
    encode_message(sample_task()),
    encode_message(Hello("w1", 5, "cpu", sent_at=2.0)),
]


def decode_or_protocol_error(payload: bytes) -> None:
    """Decode; a ProtocolError is fine, any other exception fails the test."""
    try:
        message = decode_message(payload)
    except ProtocolError as e:
        assert e.reason
        return
    assert isinstance(message, Job | GlobalModel | Task | Update | Hello)


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_PAYLOADS)))
    operation = draw(st.sampled_from(["flip", "truncate", "splice", "overwrite"]))
    if operation == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
    elif operation == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif operation == "splice":
        other = draw(st.sampled_from(VALID_PAYLOADS))
        start = draw(st.integers(0, len(data)))
        data[start:] = other[draw(st.integers(0, len(other))) :]
    else:
        position = draw(st.integers(0, len(data) - 1))
        data[position : position + 4] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=512))
def test_random_bytes_raise_only_protocol_errors(payload: bytes) -> None:
    decode_or_protocol_error(payload)


@settings(max_examples=300, deadline=None)
@given(payload=mutated_payloads())
def test_mutated_valid_messages_raise_only_protocol_errors(payload: bytes) -> None:
    decode_or_protocol_error(payload)
