"""A NaN or Inf metric is refused where it is made (the encoder), and a receiver's error names
whose metrics are bad: a task's global model, or an update."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from shared.errors import FieldError
from shared.jobs import ModelSpec, TrainingConfig
from shared.messages import GlobalModel, Task, Update, decode_message, encode_message

pytestmark = pytest.mark.timeout(30)

TENSORS = {"w": np.zeros(2, np.float32)}


def _task(metrics: dict[str, float]) -> Task:
    model = GlobalModel("job-1", 2, ModelSpec("mlp", (1, 8, 8), 10), TENSORS, metrics)
    return Task("job-1", "t1", "w1", None, TrainingConfig(), model, issued_at=1.0)


def _update(metrics: dict[str, float]) -> Update:
    return Update("job-1", "u1", "w1", "t1", 0, None, "weights", 10, TENSORS, metrics, 1.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_task_whose_model_metrics_are_not_finite_is_refused_by_the_encoder(value: float) -> None:
    with pytest.raises(FieldError) as caught:
        encode_message(_task({"accuracy": 0.5, "loss": value}))

    assert caught.value.reason == "not_finite"
    assert "global model metric 'loss'" in str(caught.value)


def test_an_update_whose_metrics_are_not_finite_is_refused_by_the_encoder() -> None:
    with pytest.raises(FieldError, match="update metric 'loss'"):
        encode_message(_update({"loss": float("nan")}))


def test_a_worker_refusing_a_task_with_a_nan_model_loss_says_it_is_the_global_models() -> None:
    body = msgpack.unpackb(encode_message(_task({"loss": 1.0})))
    body["model"]["metrics"]["loss"] = float("nan")

    with pytest.raises(FieldError) as caught:
        decode_message(msgpack.packb(body, use_bin_type=True))

    assert caught.value.reason == "not_finite"
    message = str(caught.value)
    assert "global model" in message and "version 2" in message and "aggregator" in message


def test_finite_metrics_still_make_the_round_trip() -> None:
    task = _task({"accuracy": 0.5, "loss": 0.25})

    decoded = decode_message(encode_message(task))

    assert isinstance(decoded, Task)
    assert decoded.model.metrics == {"accuracy": 0.5, "loss": 0.25}
