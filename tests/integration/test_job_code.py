"""What a job may make the services run, on the in-process broker: a job or task naming
`module:function` code outside the operator's allowed_modules ends as bad_job at the aggregator
and is refused by the worker, without anything of it being called; with require_user_id and
job_submitters, only a listed submitter's jobs and cancels are taken, and who submitted a job is
recorded."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from memory_job import JOB_ID, TOPOLOGY, aggregator, dead_letters, memory_worker

from aggregator.cli import main
from aggregator.service import AggregatorService
from broker import MemoryBroker, MemoryTransport
from broker.topology import JOB_ROUTING_KEY, UPDATE_ROUTING_KEY
from shared.jobs import JobSpec, ModelSpec, StopConfig, TrainingConfig
from shared.messages import (
    Cancel,
    Failure,
    GlobalModel,
    Job,
    Message,
    Task,
    decode_message,
    encode_message,
)
from shared.models import build_model, state_to_numpy

pytestmark = pytest.mark.timeout(120)
MLP = ModelSpec("mlp", (1, 8, 8), 10)


@pytest.fixture
def mkdir_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """os.mkdir, recording every call that a job's reference could make (anything but a path
    object, which is the services' own Path.mkdir) instead of making a directory."""
    calls: list[object] = []
    real = os.mkdir

    def recording(path: object, *args: object, **kwargs: object) -> None:
        if isinstance(path, os.PathLike):
            real(path, *args, **kwargs)  # type: ignore[arg-type]
        else:
            calls.append(path)

    monkeypatch.setattr(os, "mkdir", recording)
    return calls


def _spec(model: ModelSpec = MLP, dataset: str = "digits") -> JobSpec:
    return JobSpec(name="t", model=model, dataset=dataset, stop=StopConfig(max_versions=10))


def _publish(memory: MemoryBroker, message: Message, user: str | None = None) -> None:
    sender = MemoryTransport(memory, TOPOLOGY, user=user)
    sender.publish(TOPOLOGY.jobs, JOB_ROUTING_KEY, encode_message(message))


def _outcomes(state_dir: Path) -> list[dict]:
    lines = (state_dir / "job-outcomes.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize(
    "spec",
    [_spec(dataset="os:mkdir"), _spec(model=ModelSpec("os:mkdir", (1, 8, 8), 10))],
    ids=["dataset", "model"],
)
def test_a_job_naming_os_mkdir_ends_as_bad_job_and_mkdir_is_never_called(
    tmp_path: Path, mkdir_calls: list[object], spec: JobSpec
) -> None:
    memory = MemoryBroker()
    service = aggregator(memory, tmp_path)
    _publish(memory, Job(JOB_ID, spec))

    service.run_until_idle()

    assert mkdir_calls == []
    (outcome,) = _outcomes(tmp_path)
    assert outcome["stop_reason"] == "bad_job"
    assert "ReferenceNotAllowedError" in outcome["detail"] and "'os'" in outcome["detail"]
    assert [reason for reason, _ in dead_letters(memory)] == ["bad_job"]


def test_a_job_refused_for_its_reference_logs_one_warning_with_the_reason_and_no_traceback(
    tmp_path: Path, mkdir_calls: list[object], caplog: pytest.LogCaptureFixture
) -> None:
    memory = MemoryBroker()
    service = aggregator(memory, tmp_path)
    _publish(memory, Job(JOB_ID, _spec(dataset="os:mkdir")))

    with caplog.at_level(logging.INFO, logger="aggregator.service"):
        service.run_until_idle()

    about_it = [r for r in caplog.records if "cannot start" in r.getMessage()]
    assert [(r.levelno, r.exc_info) for r in about_it] == [(logging.WARNING, None)]
    assert "ReferenceNotAllowedError" in about_it[0].getMessage()
    assert "'os'" in about_it[0].getMessage()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_job_that_cannot_start_for_an_unexpected_error_logs_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: AggregatorService, job: Job, delivery: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(AggregatorService, "_start", broken)
    memory = MemoryBroker()
    service = aggregator(memory, tmp_path)
    _publish(memory, Job(JOB_ID, _spec()))

    with caplog.at_level(logging.INFO, logger="aggregator.service"):
        service.run_until_idle()

    (record,) = [r for r in caplog.records if "cannot start" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert _outcomes(tmp_path)[0]["stop_reason"] == "bad_job"


def test_a_job_whose_module_the_operator_allowed_runs(tmp_path: Path) -> None:
    memory = MemoryBroker()
    service = aggregator(memory, tmp_path, allowed_modules=("batchnorm_model",))
    spec = _spec(model=ModelSpec("batchnorm_model:digits_bn", (1, 8, 8), 10))
    _publish(memory, Job(JOB_ID, spec))

    service.run_until_idle()

    assert service._job is not None and service._job.job.job_id == JOB_ID
    assert dead_letters(memory) == []


def test_a_worker_refuses_a_task_whose_model_module_it_does_not_allow(
    mkdir_calls: list[object],
) -> None:
    memory = MemoryBroker()
    MemoryTransport(memory, TOPOLOGY).declare()
    worker = memory_worker(memory, allowed_modules=("batchnorm_model",))
    worker.start()
    tensors = state_to_numpy(build_model(MLP, seed=0))
    model = GlobalModel(JOB_ID, 0, ModelSpec("os:mkdir", (1, 8, 8), 10), tensors)
    task = Task(JOB_ID, "t0", "w0", None, TrainingConfig(max_batches=1), model)
    MemoryTransport(memory, TOPOLOGY).publish(TOPOLOGY.tasks, "w0", encode_message(task))

    for _ in range(40):
        worker.step(0.25)
        if not worker.busy and worker._pending is None:
            break

    reader = MemoryTransport(memory, TOPOLOGY)
    reader.subscribe(TOPOLOGY.updates)
    sent = []
    while (delivery := reader.receive(0)) is not None:
        sent.append(decode_message(delivery.body))
    (failure,) = [m for m in sent if isinstance(m, Failure)]
    assert failure.task_id == "t0" and failure.reason == "model_not_allowed"
    assert "'os'" in failure.detail
    assert mkdir_calls == []
    assert worker.metrics.tasks_failed.labels("model_not_allowed")._value.get() == 1


def test_with_require_user_id_a_job_and_a_cancel_need_a_listed_submitter(tmp_path: Path) -> None:
    memory = MemoryBroker()
    service = aggregator(memory, tmp_path, require_user_id=True, job_submitters=("alice",))
    _publish(memory, Job("anonymous-job", _spec()))
    _publish(memory, Job("mallory-job", _spec()), user="mallory")
    _publish(memory, Job(JOB_ID, _spec()), user="alice")
    service.run_until_idle()
    running = service._job is not None and service._job.job.job_id
    _publish(memory, Cancel(JOB_ID), user="mallory")
    service.run_until_idle()
    still_running = service._job is not None
    _publish(memory, Cancel(JOB_ID), user="alice")
    service.run_until_idle()

    assert running == JOB_ID and still_running and service._job is None
    assert [reason for reason, _ in dead_letters(memory)] == [
        "unattributed",
        "not_a_submitter",
        "not_a_submitter",
    ]
    summary = json.loads((tmp_path / "jobs" / JOB_ID / "summary.json").read_text())
    assert summary["stop_reason"] == "cancelled" and summary["submitted_by"] == "alice"
    assert [(o["job_id"], o["submitted_by"]) for o in _outcomes(tmp_path)] == [(JOB_ID, "alice")]


def test_without_require_user_id_or_a_list_jobs_are_taken_and_their_user_recorded(
    tmp_path: Path,
) -> None:
    memory = MemoryBroker()
    service = aggregator(memory, tmp_path)
    _publish(memory, Job(JOB_ID, _spec(dataset="nope")), user="bob")
    _publish(memory, Job("job-2", _spec(dataset="nope")))

    service.run_until_idle()

    outcomes = [(o["job_id"], o["stop_reason"], o["submitted_by"]) for o in _outcomes(tmp_path)]
    assert outcomes == [(JOB_ID, "bad_job", "bob"), ("job-2", "bad_job", None)]


def test_an_updates_queue_job_from_a_worker_is_refused_whatever_it_names(
    tmp_path: Path, mkdir_calls: list[object]
) -> None:
    memory = MemoryBroker()
    service = aggregator(memory, tmp_path, allowed_modules=("os",))
    worker = MemoryTransport(memory, TOPOLOGY, user="w0")
    body = encode_message(Job(JOB_ID, _spec(dataset="os:mkdir")))
    worker.publish(TOPOLOGY.updates, UPDATE_ROUTING_KEY, body)

    service.run_until_idle()

    assert [reason for reason, _ in dead_letters(memory)] == ["unexpected_type"]
    assert service._job is None and mkdir_calls == []


@pytest.fixture
def data_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user's data set module, `fedq_run_data:digits`, importable from a folder of its own."""
    folder = tmp_path / "site-code"
    folder.mkdir()
    (folder / "fedq_run_data.py").write_text(
        "from shared.datasets import load_dataset\n\n"
        "def digits(split):\n    return load_dataset('digits', split)\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    yield "fedq_run_data"
    sys.modules.pop("fedq_run_data", None)


def test_fedq_run_lets_its_services_import_the_model_and_data_modules_its_user_named(
    tmp_path: Path, data_module: str
) -> None:
    out = tmp_path / "run"
    argv = ["run", "--model", "batchnorm_model:digits_bn", "--dataset", f"{data_module}:digits"]
    argv += ["--workers", "2", "--strategy", "fedavg", "--max-versions", "2"]

    code = main([*argv, "--out", str(out), "--quiet"])

    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and summary["versions"] == 2 and summary["updates_accepted"] == 4
    assert summary["model"] == "batchnorm_model:digits_bn"
