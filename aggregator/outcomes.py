"""How jobs ended: finished, failed or cancelled, kept durably in the aggregator's state dir.

`<state dir>/job-outcomes.jsonl` has one line per ended job: its id, outcome, stop reason, a
detail and the broker user that submitted it. State dirs written before it existed have
`finished-jobs.txt` (one id a line, every ended job, failed ones too); those ids are read as ended
with an unknown reason and counted as finished.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.ops import json_text

# Stop reasons that mean the job failed; every other ends it as finished or cancelled.
# A job that cannot start (bad_job), or whose model diverged (diverged).
FAILED_STOP_REASONS = frozenset({"bad_job", "diverged"})
CANCELLED = "cancelled"
OUTCOMES = ("finished", "failed", "cancelled")
LEGACY_FILE = "finished-jobs.txt"
OUTCOMES_FILE = "job-outcomes.jsonl"
# /status lists at most this many failed jobs, the newest.
MAX_LISTED = 20


def outcome_of(stop_reason: str) -> str:
    """`failed`, `cancelled` or `finished`: what a stop reason means for the job."""
    if stop_reason in FAILED_STOP_REASONS:
        return "failed"
    if stop_reason == CANCELLED:
        return "cancelled"
    return "finished"


@dataclass(frozen=True)
class Outcome:
    """One ended job."""

    job_id: str
    outcome: str
    stop_reason: str
    detail: str = ""
    # The broker-validated user that published the job; None when its message had none.
    submitted_by: str | None = None


class JobOutcomes:
    """The ended jobs of one state dir; record() appends and syncs before it returns.

    Read from the HTTP thread (/status) while the service loop records: readers take a copy.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / OUTCOMES_FILE
        self._ended: dict[str, Outcome] = {}
        legacy = state_dir / LEGACY_FILE
        if legacy.exists():
            for line in legacy.read_text(encoding="utf-8").splitlines():
                if line:
                    self._ended[line] = Outcome(line, "finished", "unknown")
        # Bytes of the file read so far: a hot standby on the same state dir reads what the
        # active aggregator appended since (see _catch_up).
        self._read = 0
        self._catch_up()

    def _catch_up(self) -> None:
        """Read the records appended to the file since it was last read (by this process or by
        another aggregator sharing the state dir)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self._read)
            tail = fh.read()
        # A line cut short (a crash, or a write under way) is not a record yet.
        complete = tail[: tail.rfind(b"\n") + 1]
        for line in complete.decode("utf-8", "replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line a crash cut short, ended by the record written after it
            self._add(record)
        self._read += len(complete)

    def _add(self, record: dict[str, Any]) -> None:
        job_id = str(record["job_id"])
        submitted_by = record.get("submitted_by")
        self._ended[job_id] = Outcome(
            job_id,
            str(record["outcome"]),
            str(record["stop_reason"]),
            str(record["detail"]),
            None if submitted_by is None else str(submitted_by),
        )

    def __contains__(self, job_id: object) -> bool:
        return self.get(str(job_id)) is not None

    def get(self, job_id: str) -> Outcome | None:
        """The outcome of a job, or None if it has not ended (here or, for a hot standby, in
        the active aggregator that shares the state dir)."""
        if job_id not in self._ended:
            self._catch_up()
        return self._ended.get(job_id)

    def record(
        self, job_id: str, stop_reason: str, detail: str = "", submitted_by: str | None = None
    ) -> Outcome:
        """Record that a job ended with this stop reason (a later record of it wins), and the
        broker user that submitted it (None: unknown)."""
        record = {
            "job_id": job_id,
            "outcome": outcome_of(stop_reason),
            "stop_reason": stop_reason,
            "detail": detail,
            "submitted_by": submitted_by,
            "ended_at": time.time(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._catch_up()
        with open(self.path, "ab") as fh:
            # A line a crash cut short is ended first, so that this record is a line of its own.
            cut = fh.tell() > self._read
            fh.write((("\n" if cut else "") + json_text(record) + "\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        self._catch_up()
        return self._ended[job_id]

    def counts(self) -> dict[str, int]:
        """How many jobs ended with each outcome."""
        out = dict.fromkeys(OUTCOMES, 0)
        for ended in list(self._ended.values()):
            out[ended.outcome] = out.get(ended.outcome, 0) + 1
        return out

    def failed(self) -> list[dict[str, str]]:
        """The newest failed jobs (at most MAX_LISTED), oldest first, with their reasons."""
        failed = [e for e in list(self._ended.values()) if e.outcome == "failed"][-MAX_LISTED:]
        return [{"job_id": e.job_id, "reason": e.stop_reason, "detail": e.detail} for e in failed]
