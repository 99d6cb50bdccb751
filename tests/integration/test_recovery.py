"""An aggregator killed mid-job and restarted on its state directory goes on exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from memory_job import (
    TOPOLOGY,
    aggregator,
    answer,
    broker_with_job,
    fedbuff_spec,
    read_history,
    send_delta,
    tasks_sent,
)
from safetensors.numpy import load_file

from aggregator.checkpoint import decode_checkpoint, encode_checkpoint
from broker import MemoryBroker, MemoryTransport

SPEC = fedbuff_spec(buffer_size=2, max_versions=3)
_aggregator = aggregator
_history = read_history


def _broker() -> tuple[MemoryBroker, MemoryTransport]:
    return broker_with_job(SPEC)


def _send(sender: MemoryTransport, update_id: str, base: int) -> None:
    send_delta(sender, update_id, base, value=int(update_id[1:]) / 100)


def test_a_restarted_aggregator_resumes_from_its_checkpoint_and_counts_each_update_once(
    tmp_path: Path,
) -> None:
    memory, sender = _broker()
    first = _aggregator(memory, tmp_path)
    first.run_until_idle()
    _send(sender, "u1", 0)
    _send(sender, "u2", 0)
    _send(sender, "u3", 1)  # waits in the buffer, not yet acked
    first.run_until_idle()

    first.transport.close()  # the crash: unacked deliveries go back to their queues
    second = _aggregator(memory, tmp_path)
    second.run_until_idle()
    for update_id, base in (("u4", 1), ("u2", 0), ("u5", 2), ("u6", 2)):
        _send(sender, update_id, base)
    second.run_until_idle()

    history = _history(tmp_path)
    assert [h["version"] for h in history] == [0, 1, 2, 3]
    assert [h["update_ids"] for h in history[1:]] == [["u1", "u2"], ["u3", "u4"], ["u5", "u6"]]
    rejections = (tmp_path / "jobs" / "job-1" / "rejections.jsonl").read_text().splitlines()
    assert [json.loads(r)["update_id"] for r in rejections] == ["u2"]
    assert json.loads(rejections[0])["reason"] == "duplicate"
    assert memory.depth(TOPOLOGY.updates) == 0 and memory.depth(TOPOLOGY.jobs) == 0


def test_the_model_after_a_crash_is_bit_identical_to_the_model_without_one(
    tmp_path: Path,
) -> None:
    memory, sender = _broker()
    crashing = _aggregator(memory, tmp_path / "crash")
    crashing.run_until_idle()
    _send(sender, "u1", 0)
    _send(sender, "u2", 0)
    _send(sender, "u3", 1)
    crashing.run_until_idle()
    crashing.transport.close()
    resumed = _aggregator(memory, tmp_path / "crash")
    resumed.run_until_idle()
    for update_id, base in (("u4", 1), ("u5", 2), ("u6", 2)):
        _send(sender, update_id, base)
    resumed.run_until_idle()

    memory2, sender2 = _broker()
    steady = _aggregator(memory2, tmp_path / "steady")
    steady.run_until_idle()
    for update_id, base in (("u1", 0), ("u2", 0), ("u3", 1), ("u4", 1), ("u5", 2), ("u6", 2)):
        _send(sender2, update_id, base)
    steady.run_until_idle()

    after_crash = load_file(tmp_path / "crash" / "jobs" / "job-1" / "model.safetensors")
    without = load_file(tmp_path / "steady" / "jobs" / "job-1" / "model.safetensors")
    assert list(after_crash) == list(without)
    assert all(after_crash[n].tobytes() == without[n].tobytes() for n in without)


def test_a_job_found_finished_on_restart_is_acknowledged_without_running_again(
    tmp_path: Path,
) -> None:
    memory, _ = _broker()
    (tmp_path / "jobs" / "job-1").mkdir(parents=True)
    (tmp_path / "jobs" / "job-1" / "summary.json").write_text("{}")
    service = _aggregator(memory, tmp_path)

    service.run_until_idle()

    assert service.jobs_done == 1 and memory.depth(TOPOLOGY.jobs) == 0
    assert not (tmp_path / "jobs" / "job-1" / "history.jsonl").exists()


def test_an_update_waiting_for_its_checkpoint_keeps_only_its_handle_not_its_body(
    tmp_path: Path,
) -> None:
    memory, sender = _broker()
    service = _aggregator(memory, tmp_path)
    service.run_until_idle()
    _send(sender, "u1", 0)  # half a FedBuff buffer: accepted, not yet in a checkpoint

    service.run_until_idle()

    assert service.status()["updates_held"] == 1
    held = service._job.unacked if service._job else []
    assert [len(d.body) for d in held] == [0] and held[0].handles
    assert memory.depth(TOPOLOGY.updates) == 0  # delivered, unacked, not given back


def test_an_update_for_a_task_issued_before_a_restart_is_accepted_after_it_and_only_once(
    tmp_path: Path,
) -> None:
    memory, sender = _broker()
    first = _aggregator(memory, tmp_path, known_key=False)  # its own key, kept in tmp_path
    first.run_until_idle()
    (before,) = tasks_sent(memory, "w0")
    answer(sender, before, "u1")
    answer(sender, before, "u1-again")  # the same result under a new update id
    first.run_until_idle()
    first.transport.close()  # the crash; u1 waits in the buffer, not yet checkpointed

    second = _aggregator(memory, tmp_path, known_key=False)
    second.run_until_idle()  # u1 is redelivered and folded again, its replay still refused
    answer(sender, before, "u1-late")  # a replay after the restart
    second.run_until_idle()
    # The task sent by the first aggregator once u1 was in, then the one the second sent.
    issued_before, issued_after = tasks_sent(memory, "w0")
    answer(sender, issued_before, "u2")
    answer(sender, issued_after, "u3")
    second.run_until_idle()

    assert (tmp_path / "task-key").stat().st_mode & 0o777 == 0o600
    rejections = (tmp_path / "jobs" / "job-1" / "rejections.jsonl").read_text().splitlines()
    assert [json.loads(r)["reason"] for r in rejections] == ["task_used", "task_used"]
    assert [h["update_ids"] for h in _history(tmp_path)[1:]] == [["u1", "u2"]]
    assert second.status()["updates_held"] == 1  # u3, in the buffer of the next version


def test_a_job_resumed_from_a_checkpoint_whose_model_holds_nan_ends_as_diverged(
    tmp_path: Path,
) -> None:
    memory, sender = _broker()
    first = _aggregator(memory, tmp_path)
    first.run_until_idle()
    _send(sender, "u1", 0)
    _send(sender, "u2", 0)
    first.run_until_idle()
    first.transport.close()
    tasks_sent(memory)  # the first aggregator's tasks, taken off the queue
    # A checkpoint written before versions were checked for NaN and Inf.
    newest = sorted((tmp_path / "jobs" / "job-1" / "checkpoints").glob("*.ckpt"))[-1]
    job_id, state, figures = decode_checkpoint(newest.read_bytes())
    name = next(iter(state["model"]))
    state["model"][name] = np.full_like(state["model"][name], np.nan)
    newest.write_bytes(encode_checkpoint(job_id, state, figures))

    second = _aggregator(memory, tmp_path)
    second.run_until_idle()
    _send(sender, "u3", 1)
    second.run_until_idle()

    summary = json.loads((tmp_path / "jobs" / "job-1" / "summary.json").read_text())
    assert (summary["stop_reason"], summary["versions"]) == ("diverged", 1)
    assert second.metrics.models_nonfinite._value.get() == 1
    assert all(np.isfinite(a).all() for t in tasks_sent(memory) for a in t.model.tensors.values())
    assert second.jobs_done == 1
