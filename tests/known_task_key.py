"""A task key the tests know: aggregators started on a state directory that holds it issue task
ids a test can also compute, so that an update built by hand answers a task, as a worker's does
(aggregator/tasks.py). Tests that take their task ids from the task queues need none of this.
"""

from __future__ import annotations

from pathlib import Path

from aggregator.tasks import TASK_KEY_FILE, TaskIds

KEY = bytes(range(32))


def use_known_key(state_dir: Path) -> Path:
    """Put the known key in an aggregator's state directory (unless it holds a key already)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / TASK_KEY_FILE
    if not path.exists():
        path.write_text(KEY.hex() + "\n")
        path.chmod(0o600)
    return state_dir


def task_id(job_id: str, worker_id: str, base_version: int, nonce: str | None = None) -> str:
    """A task id the aggregator could have issued to `worker_id` with the model of
    `base_version` (a fresh one each call, unless `nonce`, 32 hex digits, is given)."""
    return TaskIds(KEY, job_id).issue(worker_id, base_version, nonce)
