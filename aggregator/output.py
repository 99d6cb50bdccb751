"""A job's run directory: history, summary, the last and the best model as safetensors."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as safetensors_save

from shared.ops import json_text

# The last version of a job, and the best evaluated one (highest held-out accuracy).
MODEL_FILE = "model.safetensors"
BEST_MODEL_FILE = "model-best.safetensors"


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDirectory:
    """Writes one job's outputs; a history line is appended as each version appears."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def append_history(self, record: Mapping[str, Any]) -> None:
        """Append one version's record to history.jsonl (a file handle per line: versions are
        seconds apart, and nothing stays open for a crash to leave half-written)."""
        with open(self.path / "history.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json_text(record, sort_keys=True) + "\n")

    def append_rejection(self, record: Mapping[str, Any]) -> None:
        """Record one rejected update with its reason in rejections.jsonl."""
        with open(self.path / "rejections.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json_text(record, sort_keys=True) + "\n")

    def truncate_history(self, max_version: int) -> None:
        """Drop history lines of versions after max_version (written after the last checkpoint)."""
        path = self.path / "history.jsonl"
        if not path.exists():
            return
        kept = [
            line
            for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.endswith("\n") and json.loads(line)["version"] <= max_version
        ]
        write_atomic(path, "".join(kept).encode())

    def last_history_version(self) -> int | None:
        """The version of the last whole line of history.jsonl, or None if there is none."""
        path = self.path / "history.jsonl"
        if not path.exists():
            return None
        lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]
        whole = [line for line in lines if line.endswith("\n")]
        return int(json.loads(whole[-1])["version"]) if whole else None

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json atomically (NaN or infinite figures as null: it stays JSON)."""
        write_atomic(self.path / "summary.json", json_text(summary, indent=2).encode() + b"\n")

    def write_model(
        self,
        tensors: Mapping[str, np.ndarray],
        metadata: Mapping[str, str],
        file: str = MODEL_FILE,
    ) -> None:
        """Write a model as safetensors (names in state_dict order), atomically."""
        contiguous = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
        write_atomic(self.path / file, safetensors_save(contiguous, dict(metadata)))

    def model_metadata(self, file: str) -> dict[str, str] | None:
        """The metadata of a model file written before, or None if there is none."""
        path = self.path / file
        if not path.exists():
            return None
        with safe_open(str(path), framework="numpy") as fh:
            return dict(fh.metadata() or {})
