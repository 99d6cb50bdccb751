"""Atomic, verified checkpoints of a job's aggregation state: msgpack, never pickle.

File layout: 8 bytes magic, 32 bytes sha256 of the body, the msgpack body. A checkpoint is
written to a temporary file, fsynced and renamed (then the directory is fsynced), so a reader
sees a whole checkpoint or none; one that fails its checksum is never used: the previous is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import msgpack

from aggregator.output import write_atomic
from shared.errors import FedqError, ProtocolError
from shared.tensors import decode_tensors, encode_tensors

logger = logging.getLogger(__name__)

MAGIC = b"FEDQCKP1"
KEEP = 2
_NAME = re.compile(r"^checkpoint-(\d{8})-(\d{8})\.ckpt$")
_TENSOR_KEYS = ("model", "buffer")


class CheckpointError(FedqError):
    """A checkpoint file is truncated, corrupt or of another format."""


def encode_checkpoint(job_id: str, state: dict[str, Any], service: dict[str, Any]) -> bytes:
    """Serialise a state snapshot (arrays as wire tensors) and the service's figures."""
    plain = {k: (encode_tensors(v) if k in _TENSOR_KEYS else v) for k, v in state.items()}
    body: bytes = msgpack.packb(
        {"job_id": job_id, "state": plain, "service": service}, use_bin_type=True
    )
    return MAGIC + hashlib.sha256(body).digest() + body


def decode_checkpoint(data: bytes) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Verify and decode a checkpoint; raise CheckpointError if it is not whole and intact."""
    if len(data) < 40 or data[:8] != MAGIC:
        raise CheckpointError("not a fedq checkpoint (bad magic or truncated)")
    body = data[40:]
    if hashlib.sha256(body).digest() != data[8:40]:
        raise CheckpointError("checkpoint checksum mismatch")
    try:
        decoded = msgpack.unpackb(body, raw=False)
        state = decoded["state"]
        # The model is always there; an empty buffer is left out of the snapshot.
        for key in [key for key in _TENSOR_KEYS if key == "model" or key in state]:
            state[key] = {n: a.copy() for n, a in decode_tensors(state[key]).items()}
        return str(decoded["job_id"]), state, dict(decoded["service"])
    except (ValueError, KeyError, TypeError, ProtocolError) as e:
        raise CheckpointError(f"checkpoint body is invalid: {e}") from e


class CheckpointStore:
    """The checkpoints of one job in one directory, newest last; keeps the last two."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._sequence = max((seq for _, seq, _ in self._files()), default=0)

    def _files(self) -> list[tuple[int, int, Path]]:
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), int(match.group(2)), path))
        return sorted(found, key=lambda item: (item[1], item[0]))

    def save(self, job_id: str, state: dict[str, Any], service: dict[str, Any]) -> Path:
        """Write a checkpoint durably, then drop all but the newest KEEP."""
        self._sequence += 1
        path = self.directory / f"checkpoint-{state['version']:08d}-{self._sequence:08d}.ckpt"
        write_atomic(path, encode_checkpoint(job_id, state, service))
        _fsync_directory(self.directory)
        for _, _, old in self._files()[:-KEEP]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Return (state, service) of the newest intact checkpoint, or None if there is none."""
        for _, _, path in reversed(self._files()):
            try:
                _, state, service = decode_checkpoint(path.read_bytes())
            except (OSError, CheckpointError) as e:
                logger.error("skipping checkpoint %s: %s", path, e)
                continue
            logger.info("resuming from %s (version %d)", path.name, state["version"])
            return state, service
        return None


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: fsync the directory that holds it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
