"""The `failure` message: a worker's report that it cannot train a task, and its validation."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from shared.errors import ProtocolError
from shared.messages import MAX_FAILURE_DETAIL, Failure, decode_message, encode_message

VALID = {
    "protocol": 1,
    "type": "failure",
    "worker_id": "site-b",
    "job_id": "job-1",
    "task_id": "t7",
    "reason": "data_mismatch",
    "detail": "labels go up to 11 but the model has 10 classes",
    "sent_at": 1700000000.0,
}


def raw(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def test_a_failure_survives_a_round_trip() -> None:
    failure = Failure("w1", "job-1", "t1", "training_error", "RuntimeError: out of memory", 2.5)

    assert decode_message(encode_message(failure)) == failure


def test_a_hand_built_failure_decodes_to_its_values() -> None:
    decoded = decode_message(raw(VALID))

    assert decoded == Failure(
        "site-b", "job-1", "t7", "data_mismatch", VALID["detail"], 1700000000.0
    )


def test_a_failure_detail_is_cut_to_its_limit() -> None:
    decoded = decode_message(raw(VALID | {"detail": "x" * 60_000}))

    assert isinstance(decoded, Failure)
    assert decoded.detail == "x" * MAX_FAILURE_DETAIL


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"reason": "Data Mismatch"}, "bad_field"),
        ({"reason": ""}, "bad_field"),
        ({"reason": "a" * 33}, "bad_field"),
        ({"reason": "data_mismatch\n"}, "bad_field"),
        ({"reason": 3}, "bad_field"),
        ({"reason": None}, "bad_field"),
        ({"detail": b"bytes"}, "bad_field"),
        ({"detail": None}, "bad_field"),
        ({"worker_id": "../etc"}, "bad_field"),
        ({"job_id": ""}, "bad_field"),
        ({"task_id": True}, "bad_field"),
        ({"sent_at": float("nan")}, "bad_field"),
        ({"sent_at": "now"}, "bad_field"),
        ({"protocol": 2}, "protocol_version"),
    ],
)
def test_a_failure_with_a_hostile_value_is_rejected_with_its_reason(
    change: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_message(raw(VALID | change))

    assert caught.value.reason == reason


@pytest.mark.parametrize("missing", ["worker_id", "job_id", "task_id", "reason", "detail"])
def test_a_failure_without_a_required_field_is_missing_field(missing: str) -> None:
    body = {k: v for k, v in VALID.items() if k != missing}

    with pytest.raises(ProtocolError) as caught:
        decode_message(raw(body))

    assert caught.value.reason == "missing_field"
