"""A job keeps its last model and its best evaluated one, each saved with what it is."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from memory_job import (
    JOB_ID,
    SHAPES,
    aggregator,
    broker_with_job,
    fedbuff_spec,
    send_delta,
)
from safetensors import safe_open
from safetensors.numpy import load_file

from aggregator.evaluation import Evaluator
from aggregator.service import AggregatorService

STEP = 0.01  # what each update moves every parameter by: version k is the initial model + k STEP
# Held-out accuracy by version: up to a peak at version 2, then down.
ACCURACY = {0: 0.1, 1: 0.5, 2: 0.9, 3: 0.4, 4: 0.3}
FIRST = next(iter(SHAPES))


def version_of(tensors: Mapping[str, np.ndarray]) -> int:
    """Which version these weights are: how many steps they moved from the initial model."""
    return round(float(np.abs(tensors[FIRST] - SHAPES[FIRST]).mean()) / STEP)


@pytest.fixture
def peak_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """A fake evaluator scoring by version; version 2's evaluation waits for the gate."""
    gate = threading.Event()

    def evaluate(self: Evaluator, tensors: Mapping[str, np.ndarray]) -> tuple[float, float]:
        version = version_of(tensors)
        if version == 2:
            assert gate.wait(30), "the test never opened the gate"
        return ACCURACY[version], 1.0 - ACCURACY[version]

    monkeypatch.setattr(Evaluator, "evaluate", evaluate)
    yield gate
    gate.set()


def _drain(service: AggregatorService) -> None:
    while service.step(0.05):
        pass


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as fh:
        return dict(fh.metadata())


@pytest.mark.timeout(60)
def test_a_job_that_peaks_then_dips_keeps_the_peak_versions_tensors_as_its_best_model(
    tmp_path: Path, peak_gate: threading.Event
) -> None:
    memory, sender = broker_with_job(fedbuff_spec(buffer_size=1, max_versions=4))
    service = aggregator(memory, tmp_path)
    service.run_until_idle()  # version 0 scored
    send_delta(sender, "u1", 0, STEP)
    service.run_until_idle()  # version 1 scored
    send_delta(sender, "u2", 1, STEP)
    _drain(service)  # version 2 made; its evaluation is held at the gate
    send_delta(sender, "u3", 2, STEP)
    _drain(service)  # version 3 made while version 2 is still being scored
    run = tmp_path / "jobs" / JOB_ID

    # The peak's evaluation lands when the model is already version 3: its own tensors are saved.
    peak_gate.set()
    service.run_until_idle()
    assert version_of(load_file(run / "model-best.safetensors")) == 2
    send_delta(sender, "u4", 3, STEP)
    service.run_until_idle()

    assert version_of(load_file(run / "model-best.safetensors")) == 2
    assert version_of(load_file(run / "model.safetensors")) == 4
    best, last = _metadata(run / "model-best.safetensors"), _metadata(run / "model.safetensors")
    assert (best["kind"], best["version"], float(best["accuracy"])) == ("best", "2", 0.9)
    assert (last["kind"], last["version"], float(last["accuracy"])) == ("last", "4", 0.3)
    assert best["job_id"] == last["job_id"] == JOB_ID
    summary = json.loads((run / "summary.json").read_text())
    assert summary["models"] == {
        "last": {"file": "model.safetensors", "version": 4, "accuracy": 0.3},
        "best": {"file": "model-best.safetensors", "version": 2, "accuracy": 0.9},
    }
    assert summary["best_accuracy"] == 0.9


@pytest.mark.timeout(60)
def test_the_best_model_survives_a_crash_and_a_worse_version_after_it_does_not_replace_it(
    tmp_path: Path, peak_gate: threading.Event
) -> None:
    peak_gate.set()
    memory, sender = broker_with_job(fedbuff_spec(buffer_size=1, max_versions=3))
    first = aggregator(memory, tmp_path)
    first.run_until_idle()
    for k in (1, 2):
        send_delta(sender, f"u{k}", k - 1, STEP)
        first.run_until_idle()
    run = tmp_path / "jobs" / JOB_ID
    assert version_of(load_file(run / "model-best.safetensors")) == 2

    first.transport.close()  # the crash: no model.safetensors yet, the best one is on disk
    assert not (run / "model.safetensors").exists()
    second = aggregator(memory, tmp_path)
    second.run_until_idle()
    send_delta(sender, "u3", 2, STEP)
    second.run_until_idle()

    assert version_of(load_file(run / "model-best.safetensors")) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["models"]["best"] == {
        "file": "model-best.safetensors",
        "version": 2,
        "accuracy": 0.9,
    }
    assert summary["models"]["last"]["version"] == 3
