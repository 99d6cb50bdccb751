"""Atomic, verified checkpoints of a job's aggregation state: msgpack, never pickle.

File layout: 8 bytes magic, 32 bytes sha256 of the body, the msgpack body. A checkpoint is
written to a temporary file, fsynced and renamed (then the directory is fsynced), so a reader
sees a whole checkpoint or none; one that fails its checksum is never used: the previous is.

Every update id a job has seen, and every task an accepted update answered, would make each
checkpoint grow with the job, so the store keeps them apart, in logs beside the checkpoints
(`seen-ids.log`, `used-tasks.log`): records of [4-byte big-endian length, 32-byte sha256, msgpack
list of ids], each holding the ids added since the record before it, appended and fsynced before
the checkpoint that counts them is written. A checkpoint records how many ids and log bytes of
each log it covers; loading it reads the logs up to there and cuts off what a checkpoint that
never completed had appended.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
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
SEEN_LOG = "seen-ids.log"
USED_LOG = "used-tasks.log"
# The snapshot's growing id lists, each with its log and the key that counts it in a checkpoint.
_LOGGED = (("seen_update_ids", SEEN_LOG, "seen_log"), ("used_tasks", USED_LOG, "used_log"))
_RECORD_HEAD = struct.Struct(">I32s")


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
    """The checkpoints of one job in one directory, newest last; keeps the last two, and the
    logs of the ids they count (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._sequence = max((seq for _, seq, _ in self._files()), default=0)
        self._logs = {key: _IdLog(directory, name) for key, name, _ in _LOGGED}

    def _files(self) -> list[tuple[int, int, Path]]:
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), int(match.group(2)), path))
        return sorted(found, key=lambda item: (item[1], item[0]))

    def save(self, job_id: str, state: dict[str, Any], service: dict[str, Any]) -> Path:
        """Log the ids added since the last checkpoint, then write the checkpoint durably,
        then drop all but the newest KEEP."""
        body = dict(state)
        for key, _, counted in _LOGGED:
            body[counted] = self._logs[key].log(body.pop(key, []))
        self._sequence += 1
        path = self.directory / f"checkpoint-{state['version']:08d}-{self._sequence:08d}.ckpt"
        write_atomic(path, encode_checkpoint(job_id, body, service))
        _fsync_directory(self.directory)
        for _, _, old in self._files()[:-KEEP]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Return (state, service) of the newest intact checkpoint, or None if there is none."""
        for _, _, path in reversed(self._files()):
            try:
                _, state, service = decode_checkpoint(path.read_bytes())
                counts = {}
                for key, _, counted in _LOGGED:
                    if counted in state:
                        found = state.pop(counted)
                        ids, size = int(found["ids"]), int(found["bytes"])
                        state[key] = self._logs[key].read(size, ids)
                    else:  # written before the log existed: the ids (if any) are in it
                        ids, size = len(state.setdefault(key, [])), 0
                    counts[key] = (ids, size)
            except (OSError, CheckpointError, KeyError, TypeError, ValueError) as e:
                logger.error("skipping checkpoint %s: %s", path, e)
                continue
            for key, (ids, size) in counts.items():
                self._logs[key].resume(ids, size)
            logger.info("resuming from %s (version %d)", path.name, state["version"])
            return state, service
        return None


class _IdLog:
    """One append-only log of ids (see the module docstring) and how much of it this store's
    checkpoints count."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.path = directory / name
        self.logged_ids = 0
        self.logged_bytes = 0

    def log(self, ids: list[str]) -> dict[str, int]:
        """Append the ids past those already logged; return what a checkpoint counts."""
        if self.logged_ids == 0 and self.logged_bytes == 0:
            # A fresh job, or one whose checkpoints predate the log: start it afresh.
            self.truncate(0)
        if len(ids) > self.logged_ids:
            self._append(ids[self.logged_ids :])
            self.logged_ids = len(ids)
        return {"ids": self.logged_ids, "bytes": self.logged_bytes}

    def resume(self, ids: int, size: int) -> None:
        """Go on from a loaded checkpoint: cut off what a checkpoint that never completed (or
        a corrupt newer one) had appended."""
        self.truncate(size)
        self.logged_ids, self.logged_bytes = (ids, size) if size else (0, 0)

    def _append(self, ids: list[str]) -> None:
        payload: bytes = msgpack.packb(ids, use_bin_type=True)
        record = _RECORD_HEAD.pack(len(payload), hashlib.sha256(payload).digest()) + payload
        new = not self.path.exists()
        with open(self.path, "ab") as fh:
            fh.write(record)
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            _fsync_directory(self.directory)
        self.logged_bytes += len(record)

    def read(self, size: int, count: int) -> list[str]:
        """The ids in the first `size` bytes of the log; CheckpointError unless exactly `count`
        intact ids are there."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read(size)
        except FileNotFoundError:
            data = b""
        if len(data) != size:
            raise CheckpointError(f"{self.name} holds {len(data)} of the {size} bytes counted")
        ids: list[str] = []
        offset = 0
        while offset < size:
            if size - offset < _RECORD_HEAD.size:
                raise CheckpointError(f"{self.name} is cut inside a record header")
            length, digest = _RECORD_HEAD.unpack_from(data, offset)
            payload = data[offset + _RECORD_HEAD.size : offset + _RECORD_HEAD.size + length]
            if len(payload) != length or hashlib.sha256(payload).digest() != digest:
                raise CheckpointError(f"{self.name}: a record at byte {offset} is damaged")
            chunk = msgpack.unpackb(payload, raw=False)
            if not isinstance(chunk, list) or not all(isinstance(i, str) for i in chunk):
                raise CheckpointError(
                    f"{self.name}: a record at byte {offset} is not a list of ids"
                )
            ids += chunk
            offset += _RECORD_HEAD.size + length
        if len(ids) != count:
            raise CheckpointError(f"{self.name} holds {len(ids)} ids where {count} were counted")
        return ids

    def truncate(self, size: int) -> None:
        """Cut the log to its first `size` bytes (nothing if it does not exist)."""
        if not self.path.exists():
            return
        with open(self.path, "r+b") as fh:
            fh.truncate(size)
            fh.flush()
            os.fsync(fh.fileno())


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: fsync the directory that holds it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
