"""Services as processes: SIGTERM stops them cleanly, a worker first sends what it trained."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from rabbitmq_scratch import Scratch, Spawn

from broker.transport import Transport
from shared.jobs import ModelSpec, TrainingConfig
from shared.messages import GlobalModel, Hello, Task, Update, decode_message, encode_message
from shared.models import build_model, state_to_numpy

pytestmark = pytest.mark.rabbitmq
MODEL = ModelSpec("mlp", (1, 8, 8), 10)


def _wait_for(reader: Transport, kind: type, timeout: float = 60.0) -> object:
    """Receive (and ack) messages from the reader's queues until one of this kind comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        delivery = reader.receive(0.2)
        if delivery is not None:
            reader.ack(delivery)
            message = decode_message(delivery.body)
            if isinstance(message, kind):
                return message
    raise AssertionError(f"no {kind.__name__} within {timeout} s")


@pytest.mark.timeout(120)
def test_sigterm_makes_a_training_worker_send_its_update_then_exit_zero(
    scratch: Scratch, tmp_path: Path, spawn: Spawn
) -> None:
    # The updates queue has a single active consumer, which basic.get cannot bypass.
    reader = scratch.transport()
    reader.declare()
    reader.subscribe(scratch.topology.updates)
    worker_id = scratch.worker("w0")
    worker = spawn(
        "worker", "worker", "--worker-id", worker_id, "--dataset", "digits",
        "--threads", "1", "--slowdown", "400",
    )  # fmt: skip
    _wait_for(reader, Hello)
    weights = state_to_numpy(build_model(MODEL, seed=0))
    task = Task("job", "t1", worker_id, None, TrainingConfig(max_batches=2),
                GlobalModel("job", 3, MODEL, weights))  # fmt: skip
    scratch.transport().publish(scratch.topology.tasks, worker_id, encode_message(task))
    time.sleep(2.0)  # the task is taken and training (stretched by --slowdown) is under way

    worker.send_signal(signal.SIGTERM)
    code = worker.wait(60)

    assert code == 0, (tmp_path / "worker.log").read_text()
    update = _wait_for(reader, Update, timeout=5)
    assert isinstance(update, Update) and update.task_id == "t1" and update.base_version == 3


@pytest.mark.timeout(120)
def test_sigterm_stops_an_idle_aggregator_with_exit_code_zero(
    scratch: Scratch, tmp_path: Path, spawn: Spawn
) -> None:
    aggregator = spawn("aggregator", "aggregator", "--state-dir", str(tmp_path / "state"))
    deadline = time.monotonic() + 60
    while "aggregator ready" not in (tmp_path / "aggregator.log").read_text():
        assert time.monotonic() < deadline and aggregator.poll() is None
        time.sleep(0.2)

    aggregator.send_signal(signal.SIGTERM)

    assert aggregator.wait(30) == 0
