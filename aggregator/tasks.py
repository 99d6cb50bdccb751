"""Task ids the aggregator can check without remembering them: a nonce and a MAC over it.

A task id is `<nonce>.<mac>`: 32 hex digits of random nonce, a dot, and the first 32 hex digits
of HMAC-SHA256, under the aggregator's task key, of the job id, the worker id, the base version
the task carries and the nonce (docs/protocol.md, "What an update may claim"). An update whose
task id does not verify for its own job, worker and base version answers no task this aggregator
issued. The key lives in the state directory, so a task issued before a restart still verifies
after it, although the aggregator keeps no list of the tasks it sent.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from aggregator.output import write_atomic
from shared.errors import ConfigError

TASK_KEY_FILE = "task-key"
KEY_BYTES = 32
_NONCE_HEX = 32
_MAC_HEX = 32


class TaskIds:
    """Issues and verifies the task ids of one job under one key."""

    def __init__(self, key: bytes, job_id: str) -> None:
        self._key = key
        self.job_id = job_id

    def issue(self, worker_id: str, base_version: int, nonce: str | None = None) -> str:
        """A new task id for a task to `worker_id` carrying the model of `base_version`."""
        nonce = nonce if nonce is not None else secrets.token_hex(_NONCE_HEX // 2)
        return f"{nonce}.{self._mac(worker_id, base_version, nonce)}"

    def verify(self, task_id: str, worker_id: str, base_version: int) -> bool:
        """Whether this key issued `task_id` to `worker_id` with the model of `base_version`."""
        nonce, dot, mac = task_id.rpartition(".")
        if not dot or len(nonce) != _NONCE_HEX or len(mac) != _MAC_HEX:
            return False
        return hmac.compare_digest(mac, self._mac(worker_id, base_version, nonce))

    def _mac(self, worker_id: str, base_version: int, nonce: str) -> str:
        # Ids cannot hold a newline (shared.messages.ID_PATTERN): the fields cannot run together.
        message = "\n".join((self.job_id, worker_id, str(base_version), nonce)).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:_MAC_HEX]


def load_task_key(state_dir: Path) -> bytes:
    """The aggregator's task key from `<state_dir>/task-key`, created (mode 0600) if absent."""
    path = state_dir / TASK_KEY_FILE
    if not path.exists():
        # write_atomic's temporary file is created 0600, and the rename keeps that mode.
        write_atomic(path, (secrets.token_hex(KEY_BYTES) + "\n").encode())
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError) as e:
        raise ConfigError(f"task key {path} is unreadable: {e}") from e
    if len(key) != KEY_BYTES:
        raise ConfigError(f"task key {path} holds {len(key)} bytes, not {KEY_BYTES}")
    return key
