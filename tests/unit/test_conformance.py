"""docs/protocol.md against the code: hand-built messages decode, encoder output matches the tables.

Messages here are built with plain msgpack from the document's tables, never with the project's
encoder, and the document's tables are parsed from the Markdown itself, so that a change on either
side that the other does not follow fails a test.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import shared.errors
from aggregator.metrics import FAILURE_REASONS
from shared.chunks import Reassembler, decode_chunk, is_chunk, split_payload
from shared.errors import ProtocolError
from shared.jobs import JobSpec, ModelSpec, StopConfig, StrategyConfig, TrainingConfig, to_dict
from shared.messages import (
    ID_PATTERN,
    Cancel,
    Failure,
    GlobalModel,
    Hello,
    Job,
    Task,
    Update,
    decode_message,
    encode_message,
)
from shared.tensors import WIRE_DTYPES

DOC = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------ reading the document


def table(name: str) -> list[dict[str, str]]:
    """The rows of the Markdown table after `<!-- table: name -->`, keyed by column header."""
    marker = f"<!-- table: {name} -->\n"
    assert marker in DOC, f"docs/protocol.md has no table {name!r}"
    lines = DOC.split(marker, 1)[1].splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]
    return [dict(zip(header, row, strict=True)) for row in body]


def unquote(cell: str) -> str:
    return cell.strip().strip("`")


def fields(name: str) -> dict[str, dict[str, str]]:
    """A field or key table as {field name: row}."""
    return {unquote(next(iter(row.values()))): row for row in table(name)}


def has_type(value: Any, described: str) -> bool:
    """Whether an unpacked msgpack value has the documented type, e.g. 'int or nil'."""
    checks = {
        "int": lambda v: type(v) is int,
        "float64": lambda v: type(v) is float,
        "str": lambda v: type(v) is str,
        "bin": lambda v: type(v) is bytes,
        "map": lambda v: type(v) is dict,
        "array": lambda v: type(v) is list,
        "nil": lambda v: v is None,
    }
    return any(checks[option](value) for option in described.split(" or "))


def assert_matches_table(body: dict[str, Any], name: str) -> None:
    documented = fields(name)
    assert set(body) == set(documented), f"{name}: keys differ from the table"
    for key, value in body.items():
        described = documented[key]["msgpack type"]
        assert has_type(value, described), f"{name}.{key} = {value!r} is not {described}"


def example_hex() -> str:
    block = DOC.split("<!-- example: update -->\n```\n", 1)[1].split("```", 1)[0]
    return "".join(block.split())


# ------------------------------------------------------------------ raw messages from the tables

EXAMPLE_UPDATE = {
    "protocol": 1,
    "type": "update",
    "job_id": "mnist-1",
    "update_id": "5f0c2a7e9b1d4e6f8a3b2c1d0e9f8a7b",
    "worker_id": "w1",
    "task_id": "t7",
    "base_version": 3,
    "round": 3,
    "kind": "delta",
    "num_samples": 600,
    "metrics": {"loss": 0.5},
    "sent_at": 1700000000.0,
    "tensors": [
        {"name": "fc.bias", "dtype": "float32", "shape": [2], "data": struct.pack("<2f", 0.5, -1.0)}
    ],
}


def raw(body: dict[str, Any], **options: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True, **options)


def raw_model(version: int = 4) -> dict[str, Any]:
    return {
        "job_id": "mnist-1",
        "version": version,
        "model": {"name": "fednet", "input_shape": [1, 28, 28], "num_classes": 10},
        "metrics": {"accuracy": 0.91},
        "tensors": [
            {
                "name": "conv.weight",
                "dtype": "float32",
                "shape": [2, 2],
                "data": struct.pack("<4f", 1, 2, 3, 4),
            },
            {"name": "bn.num_batches_tracked", "dtype": "int64", "shape": [], "data": bytes(8)},
        ],
    }


def python_objects() -> list[Any]:
    """One object of every message type, with every optional value set and unset."""
    tensors = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "n": np.array(3, dtype=np.int64),
        "mask": np.zeros(0, dtype=np.bool_),
    }
    model = GlobalModel("j", 2, ModelSpec("cnn", (1, 28, 28), 10), tensors, {"accuracy": 0.5})
    return [
        Update("j", "u", "w", "t", 2, 2, "weights", 10, tensors, {"loss": 1.0}, sent_at=1.5),
        Update("j", "u", "w", "t", 2, None, "delta", 10, tensors, {}, sent_at=1.5),
        Task("j", "t", "w", 2, TrainingConfig(), model, issued_at=2.5),
        Task("j", "t", "w", None, TrainingConfig(send="delta"), model, issued_at=2.5),
        model,
        Hello("w", 10, "cuda:0", sent_at=3.5),
        Job("j", JobSpec(), submitted_at=4.5),
        Job("j", JobSpec(stop=StopConfig(None, 0.9, 60.0)), submitted_at=4.5),
        Cancel("j", sent_at=5.5),
        Failure("w", "j", "t", "data_mismatch", "labels go up to 11", sent_at=5.5),
    ]


# ------------------------------------------------------------------ hand-built messages decode


def test_the_documented_update_example_built_by_hand_decodes_to_its_values() -> None:
    decoded = decode_message(raw(EXAMPLE_UPDATE))

    assert isinstance(decoded, Update)
    assert (decoded.job_id, decoded.update_id, decoded.worker_id) == (
        "mnist-1",
        "5f0c2a7e9b1d4e6f8a3b2c1d0e9f8a7b",
        "w1",
    )
    assert (decoded.task_id, decoded.base_version, decoded.round) == ("t7", 3, 3)
    assert (decoded.kind, decoded.num_samples, decoded.sent_at) == ("delta", 600, 1700000000.0)
    assert decoded.metrics == {"loss": 0.5}
    assert decoded.tensors["fc.bias"].tolist() == [0.5, -1.0]


def test_the_documented_hex_is_what_hand_packing_and_the_encoder_both_produce() -> None:
    by_encoder = encode_message(
        Update(
            job_id="mnist-1",
            update_id="5f0c2a7e9b1d4e6f8a3b2c1d0e9f8a7b",
            worker_id="w1",
            task_id="t7",
            base_version=3,
            round=3,
            kind="delta",
            num_samples=600,
            tensors={"fc.bias": np.array([0.5, -1.0], dtype=np.float32)},
            metrics={"loss": 0.5},
            sent_at=1700000000.0,
        )
    )

    assert raw(EXAMPLE_UPDATE).hex() == example_hex()
    assert by_encoder.hex() == example_hex()
    assert len(by_encoder) == 253


def test_the_annotated_breakdown_adds_up_to_the_documented_hex() -> None:
    block = DOC.split("<!-- annotated: update -->", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    hex_bytes = []
    for line in block.splitlines():
        for token in line.split():
            if not re.fullmatch(r"[0-9a-f]{2}", token):
                break
            hex_bytes.append(token)

    assert "".join(hex_bytes) == example_hex()


def test_a_hand_built_hello_decodes() -> None:
    body = {"protocol": 1, "type": "hello", "worker_id": "gpu-7", "num_samples": 0}
    body |= {"device": "cuda:0", "sent_at": 1700000000.25}

    decoded = decode_message(raw(body))

    assert decoded == Hello("gpu-7", 0, "cuda:0", 1700000000.25)


def test_a_hand_built_failure_decodes() -> None:
    body = {"protocol": 1, "type": "failure", "worker_id": "gpu-7", "job_id": "mnist-1"}
    body |= {"task_id": "t8", "reason": "data_mismatch", "sent_at": 1700000002.0}
    body |= {"detail": "local images are 3x32x32 but the model takes 1x28x28"}

    decoded = decode_message(raw(body))

    assert decoded == Failure(
        "gpu-7", "mnist-1", "t8", "data_mismatch", body["detail"], 1700000002.0
    )


def test_the_documented_failure_reasons_are_the_ones_the_aggregator_counts_apart() -> None:
    documented = [unquote(row["reason"]) for row in table("failure-reasons")]

    assert documented == list(FAILURE_REASONS)


def test_a_hand_built_task_with_a_partial_training_map_takes_the_defaults() -> None:
    body = {"protocol": 1, "type": "task", "job_id": "mnist-1", "task_id": "t8"}
    body |= {"worker_id": "gpu-7", "round": None, "training": {"epochs": 2, "send": "delta"}}
    body |= {"model": raw_model(), "issued_at": 1700000001}

    decoded = decode_message(raw(body))

    assert isinstance(decoded, Task)
    assert decoded.training == TrainingConfig(epochs=2, send="delta")
    assert decoded.round is None
    assert decoded.version == 4
    assert decoded.issued_at == 1700000001.0
    assert decoded.model.model == ModelSpec("fednet", (1, 28, 28), 10)
    assert list(decoded.model.tensors) == ["conv.weight", "bn.num_batches_tracked"]
    assert decoded.model.tensors["conv.weight"].tolist() == [[1, 2], [3, 4]]
    assert decoded.model.tensors["bn.num_batches_tracked"].shape == ()


def test_a_hand_built_model_message_decodes() -> None:
    decoded = decode_message(raw({"protocol": 1, "type": "model"} | raw_model(version=0)))

    assert isinstance(decoded, GlobalModel)
    assert decoded.version == 0
    assert decoded.metrics == {"accuracy": 0.91}


def test_a_hand_built_job_with_an_empty_spec_gets_every_default() -> None:
    body = {"protocol": 1, "type": "job", "job_id": "nightly", "spec": {}, "submitted_at": 5.0}

    decoded = decode_message(raw(body))

    assert decoded == Job("nightly", JobSpec(), 5.0)


def test_a_hand_built_cancel_decodes() -> None:
    body = {"protocol": 1, "type": "cancel", "job_id": "nightly-1a2b", "sent_at": 6}

    decoded = decode_message(raw(body))

    assert decoded == Cancel("nightly-1a2b", 6.0)


def test_a_hand_built_job_that_leaves_the_model_shape_out_decodes_with_it_unset() -> None:
    spec = {"model": {"name": "mlp"}, "dataset": "digits"}
    body = {"protocol": 1, "type": "job", "job_id": "j", "spec": spec, "submitted_at": 5.0}

    decoded = decode_message(raw(body))

    assert isinstance(decoded, Job)
    assert decoded.spec.model == ModelSpec("mlp", (), 0)
    assert not decoded.spec.model.complete


@pytest.mark.parametrize("model", [{"name": "mlp"}, {"input_shape": [], "num_classes": 10}])
def test_a_task_whose_model_leaves_the_shape_out_is_bad_field(model: dict[str, Any]) -> None:
    body = {"protocol": 1, "type": "task", "job_id": "mnist-1", "task_id": "t8"}
    body |= {"worker_id": "gpu-7", "round": None, "training": {}}
    body |= {"model": raw_model() | {"model": model}, "issued_at": 1700000001}

    with pytest.raises(ProtocolError) as caught:
        decode_message(raw(body))

    assert caught.value.reason == "bad_field"
    assert "input_shape" in str(caught.value)


def test_a_hand_built_job_with_nested_spec_maps_decodes() -> None:
    spec = {
        "name": "buffered",
        "model": {"name": "mlp", "input_shape": [1, 8, 8], "num_classes": 10},
        "strategy": {"name": "fedbuff", "buffer_size": 8, "max_staleness": 5},
        "training": {"optimizer": "adam", "lr": 1},
        "stop": {"max_versions": None, "max_time_s": 60},
        "seed": 7,
    }
    body = {"protocol": 1, "type": "job", "job_id": "b", "spec": spec, "submitted_at": 5.0}

    decoded = decode_message(raw(body))

    assert isinstance(decoded, Job)
    assert decoded.spec.strategy == StrategyConfig(name="fedbuff", buffer_size=8, max_staleness=5)
    assert decoded.spec.training == TrainingConfig(optimizer="adam", lr=1.0)
    assert decoded.spec.stop == StopConfig(max_versions=None, max_time_s=60.0)
    assert decoded.spec.model.input_shape == (1, 8, 8)
    assert decoded.spec.seed == 7


def test_unknown_top_level_keys_are_ignored_as_documented() -> None:
    body = EXAMPLE_UPDATE | {"compression": "none"}
    body["tensors"] = [EXAMPLE_UPDATE["tensors"][0] | {"layout": "C"}]

    decoded = decode_message(raw(body))

    assert isinstance(decoded, Update)
    assert decoded.update_id == EXAMPLE_UPDATE["update_id"]


def test_float32_timestamps_and_metrics_are_accepted_as_documented() -> None:
    payload = raw(EXAMPLE_UPDATE, use_single_float=True)

    decoded = decode_message(payload)

    assert b"\xca" in payload
    assert isinstance(decoded, Update)
    assert decoded.metrics == {"loss": 0.5}


# struct formats of the documented dtypes, little-endian as the document says.
STRUCT_FORMATS = {
    "float16": "e",
    "float32": "f",
    "float64": "d",
    "int8": "b",
    "int16": "h",
    "int32": "i",
    "int64": "q",
    "uint8": "B",
    "bool": "?",
}


@pytest.mark.parametrize("row", table("dtypes"), ids=lambda row: unquote(row["`dtype`"]))
def test_each_documented_dtype_decodes_little_endian_c_ordered_bytes(row: dict[str, str]) -> None:
    dtype = unquote(row["`dtype`"])
    values = [1, 0, 1, 1, 0, 1] if dtype == "bool" else [1, -2, 3, -4, 5, 6]
    if dtype == "uint8":
        values = [1, 2, 3, 4, 5, 255]
    data = struct.pack("<6" + STRUCT_FORMATS[dtype], *values)
    entry = {"name": "t", "dtype": dtype, "shape": [2, 3], "data": data}

    decoded = decode_message(raw(EXAMPLE_UPDATE | {"tensors": [entry]}))

    assert isinstance(decoded, Update)
    array = decoded.tensors["t"]
    assert array.dtype.itemsize == int(row["itemsize (bytes)"])
    assert array.tolist() == np.array(values, dtype=WIRE_DTYPES[dtype]).reshape(2, 3).tolist()
    assert array[1, 0] == np.array(values[3], dtype=WIRE_DTYPES[dtype])


def test_the_documented_dtype_allowlist_is_the_codec_allowlist() -> None:
    documented = {unquote(row["`dtype`"]): row for row in table("dtypes")}

    assert set(documented) == set(WIRE_DTYPES)
    for name, row in documented.items():
        assert np.dtype(unquote(row["numpy"])) == WIRE_DTYPES[name]
        assert int(row["itemsize (bytes)"]) == WIRE_DTYPES[name].itemsize


def test_a_hand_built_chunk_set_reassembles_into_a_decodable_update() -> None:
    payload = raw(
        EXAMPLE_UPDATE
        | {
            "tensors": [
                {"name": "w", "dtype": "uint8", "shape": [3000], "data": bytes(range(200)) * 15}
            ]
        }
    )
    chunk_size = 1024
    count = -(-len(payload) // chunk_size)
    digest = hashlib.sha256(payload).digest()
    envelopes = [
        raw(
            {
                "protocol": 1,
                "type": "chunk",
                "message_id": "0123456789abcdef0123456789abcdef",
                "index": index,
                "count": count,
                "total_size": len(payload),
                "sha256": digest,
                "data": payload[index * chunk_size : (index + 1) * chunk_size],
            }
        )
        for index in range(count)
    ]
    reassembler: Reassembler[int] = Reassembler()

    results = [reassembler.add(decode_chunk(e), i) for i, e in reversed(list(enumerate(envelopes)))]

    assert all(is_chunk(e) for e in envelopes)
    whole, keys = results[-1]
    assert whole == payload
    assert sorted(keys) == list(range(count))
    assert isinstance(decode_message(whole), Update)


def test_the_documented_envelope_prefix_is_the_one_receivers_look_for() -> None:
    block = DOC.split("<!-- example: chunk-prefix -->\n```\n", 1)[1]
    prefix_line = block.splitlines()[0]
    documented = bytes.fromhex("".join(prefix_line.split()))
    envelope = split_payload(bytes(2048), 1024)[0]

    assert envelope[0] == 0x88
    assert envelope[1 : 1 + len(documented)] == documented
    assert is_chunk(b"\x86" + documented)


def test_the_documented_id_pattern_agrees_with_the_codec() -> None:
    documented = re.search(r"`(\^\[A-Za-z0-9\].*?\$)`", DOC)
    assert documented is not None
    pattern = re.compile(documented.group(1).rstrip("$") + r"\Z")
    samples = ["a", "A9", "job-1.x:y_z", "x" * 128, "x" * 129, "", "-a", "a b", "abc\n", "é"]

    verdicts = [(s, bool(pattern.match(s))) for s in samples]

    assert verdicts == [(s, bool(ID_PATTERN.match(s))) for s in samples]


# ------------------------------------------------------------------ encoder output vs the tables


def test_every_message_the_encoder_writes_starts_with_the_common_fields() -> None:
    for message in python_objects():
        body = msgpack.unpackb(encode_message(message))

        assert list(body)[:2] == ["protocol", "type"]
        assert_matches_table({k: body[k] for k in ("protocol", "type")}, "common")
        assert body["protocol"] == 1


@pytest.mark.parametrize("message", python_objects(), ids=lambda m: type(m).__name__)
def test_the_encoder_writes_exactly_the_documented_fields_and_types(message: Any) -> None:
    body = msgpack.unpackb(encode_message(message))
    kind = body.pop("type")
    del body["protocol"]

    assert_matches_table(body, kind)
    assert list(body) == list(fields(kind)), "the encoder writes fields in the table's order"
    if kind in ("update", "model"):
        for entry in body["tensors"]:
            assert_matches_table(entry, "tensor")
    if kind == "task":
        assert_matches_table(body["model"], "model")
        assert_matches_table(body["training"], "TrainingConfig")
    if kind == "task" or kind == "model":
        model = body["model"]["model"] if kind == "task" else body["model"]
        assert_matches_table(model, "ModelSpec")
    if kind == "job":
        assert_matches_table(body["spec"], "JobSpec")
        for key, name in [
            ("model", "ModelSpec"),
            ("strategy", "StrategyConfig"),
            ("training", "TrainingConfig"),
            ("stop", "StopConfig"),
        ]:
            assert_matches_table(body["spec"][key], name)


def test_the_encoder_writes_floats_as_float64() -> None:
    payload = encode_message(Hello("w", 1, "cpu", sent_at=0.1))

    assert b"\xcb" + struct.pack(">d", 0.1) in payload
    assert b"\xca" not in payload


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("ModelSpec", ModelSpec),
        ("TrainingConfig", TrainingConfig),
        ("StrategyConfig", StrategyConfig),
        ("StopConfig", StopConfig),
        ("JobSpec", JobSpec),
    ],
)
def test_the_documented_spec_defaults_are_the_code_defaults(name: str, spec: type) -> None:
    defaults = to_dict(spec())
    documented = fields(name)

    assert list(documented) == list(defaults)
    for key, row in documented.items():
        cell = row["default"]
        if cell.endswith(" defaults"):
            assert cell == f"{type(getattr(spec(), key)).__name__} defaults"
            continue
        assert json.loads(unquote(cell)) == defaults[key], f"{name}.{key}"


def test_the_chunk_table_lists_exactly_the_envelope_fields() -> None:
    envelope = msgpack.unpackb(split_payload(bytes(3000), 1024)[1])

    assert list(envelope)[:2] == ["protocol", "type"]
    assert_matches_table(
        {k: v for k, v in envelope.items() if k not in ("protocol", "type")}, "chunk"
    )


def test_every_codec_reason_is_documented_with_its_exception_class() -> None:
    documented = {unquote(row["reason"]): row for row in table("reasons")}
    classes = [
        cls
        for cls in vars(shared.errors).values()
        if isinstance(cls, type) and issubclass(cls, ProtocolError) and cls is not ProtocolError
    ]

    for cls in classes:
        assert cls.reason in documented, cls.__name__
        assert (
            cls.__name__ in documented[cls.reason]["raised as (Python class in `shared/errors.py`)"]
        )
    for reason, row in documented.items():
        raised_as = row["raised as (Python class in `shared/errors.py`)"]
        named = re.findall(r"`(\w+)`", raised_as)
        assert raised_as == "(transport)" or named, reason
        for class_name in named:
            if class_name != "ChunkSetError":
                assert issubclass(getattr(shared.errors, class_name), ProtocolError)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xc1", "malformed"),
        (raw(EXAMPLE_UPDATE | {"protocol": 2}), "protocol_version"),
        (raw(EXAMPLE_UPDATE | {"type": "gossip"}), "unknown_type"),
        (raw({k: v for k, v in EXAMPLE_UPDATE.items() if k != "kind"}), "missing_field"),
        (raw(EXAMPLE_UPDATE | {"num_samples": 600.0}), "bad_field"),
        (raw(EXAMPLE_UPDATE | {"num_samples": 0}), "bad_num_samples"),
        (raw(EXAMPLE_UPDATE | {"tensors": [{"name": "w"}]}), "bad_tensor"),
        (
            raw(EXAMPLE_UPDATE | {"tensors": [EXAMPLE_UPDATE["tensors"][0] | {"dtype": "f4"}]}),
            "bad_dtype",
        ),
        (
            raw(EXAMPLE_UPDATE | {"tensors": [EXAMPLE_UPDATE["tensors"][0] | {"shape": [3]}]}),
            "bad_length",
        ),
        (raw(EXAMPLE_UPDATE | {"tensors": EXAMPLE_UPDATE["tensors"] * 2}), "duplicate_tensor"),
    ],
)
def test_documented_decoder_reasons_are_the_ones_raised(payload: bytes, reason: str) -> None:
    documented = {unquote(row["reason"]) for row in table("reasons")}

    with pytest.raises(ProtocolError) as caught:
        decode_message(payload)

    assert caught.value.reason == reason
    assert reason in documented
