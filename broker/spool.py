"""A durable spool of chunk envelopes: what lets a receiver ack each envelope as it arrives.

A chunk set can be larger than the receiver's prefetch (the broker hands out at most that many
unacknowledged envelopes), so holding every envelope of a set unacked until the set completes
can stall the consumer for good. Instead an envelope is written here (and fsynced) before it is
acked, and the broker forgets it; the spool is then the only copy until the reassembled message
is settled, which deletes the set's files. After a crash the spool is read back and its sets are
reassembled again, so an update in chunks is folded exactly once, as one in a single message is.

Layout: one directory per set, named by the SHA-256 of its sender and message id (ids are
sender-chosen strings, never paths; two senders' sets with one message id are two sets), with one
file per envelope: a msgpack map of the envelope's body and the
AMQP fields the receiver needs (queue, headers, user_id).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from shared.errors import TransportError

logger = logging.getLogger(__name__)

_SUFFIX = ".chunk"


@dataclass(frozen=True)
class SpooledEnvelope:
    """One envelope read back from the spool, with the wall-clock time it was written."""

    message_id: str
    index: int
    body: bytes
    queue: str
    headers: dict[str, Any]
    user_id: str | None
    written_at: float


class ChunkSpool:
    """Envelopes of incomplete (or complete but unsettled) chunk sets, on disk."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def save(
        self,
        message_id: str,
        index: int,
        body: bytes,
        queue: str,
        headers: dict[str, Any],
        user_id: str | None,
        sender: str = "",
    ) -> Path:
        """Write one envelope of `sender`'s set durably (file and directory fsynced); return
        its path."""
        folder = self._folder(sender, message_id)
        new_folder = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "message_id": message_id,
            "index": index,
            "queue": queue,
            "headers": _plain(headers),
            "user_id": user_id,
            "body": body,
        }
        path = folder / f"{index}{_SUFFIX}"
        tmp = folder / f".{index}{_SUFFIX}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(msgpack.packb(record, use_bin_type=True))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_directory(folder)
            if new_folder:
                _fsync_directory(self.directory)
        except OSError as e:
            raise TransportError(f"cannot spool a chunk to {folder}: {e}") from e
        return path

    def read(self, path: Path) -> SpooledEnvelope:
        """Read one spooled envelope back."""
        data = path.read_bytes()
        record = msgpack.unpackb(data, raw=False)
        return SpooledEnvelope(
            message_id=str(record["message_id"]),
            index=int(record["index"]),
            body=bytes(record["body"]),
            queue=str(record["queue"]),
            headers=dict(record["headers"]),
            user_id=record["user_id"],
            written_at=path.stat().st_mtime,
        )

    def drop(self, message_id: str, sender: str = "") -> None:
        """Delete a sender's set's envelopes (settled, dead-lettered or expired)."""
        shutil.rmtree(self._folder(sender, message_id), ignore_errors=True)

    def load(self) -> list[tuple[Path, SpooledEnvelope]]:
        """Every spooled envelope, oldest first; unreadable files are logged and removed."""
        found: list[tuple[Path, SpooledEnvelope]] = []
        if not self.directory.is_dir():
            return found
        for folder in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            for path in sorted(folder.glob(f"*{_SUFFIX}")):
                try:
                    found.append((path, self.read(path)))
                except Exception as e:  # a torn or foreign file must not stop the service
                    logger.warning("removing unreadable spooled chunk %s: %r", path, e)
                    path.unlink(missing_ok=True)
        found.sort(key=lambda item: item[1].written_at)
        return found

    def _folder(self, sender: str, message_id: str) -> Path:
        name = msgpack.packb([sender, message_id], use_bin_type=True)
        return self.directory / hashlib.sha256(name).hexdigest()[:32]


def monotonic_of(wall_time: float) -> float:
    """The time.monotonic() reading of a past wall-clock time (for a restored set's age)."""
    return time.monotonic() - max(0.0, time.time() - wall_time)


def _plain(value: Any) -> Any:
    """AMQP header values msgpack can store (pika also decodes decimals and timestamps)."""
    if isinstance(value, int) and not -(1 << 63) <= value < (1 << 64):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
