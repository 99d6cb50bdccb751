"""A job's run directory stays JSON when its figures are not finite (a diverged evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

from aggregator.output import RunDirectory


def _refuse(constant: str) -> object:
    raise ValueError(f"bare {constant} is not JSON")


def test_summary_and_history_write_nan_and_infinite_figures_as_null(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)

    run.write_summary({"final_loss": float("nan"), "best_accuracy": 0.5})
    run.append_history({"version": 1, "loss": float("inf"), "accuracy": None})

    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=_refuse)
    history = json.loads((tmp_path / "history.jsonl").read_text(), parse_constant=_refuse)
    assert summary == {"final_loss": None, "best_accuracy": 0.5}
    assert history == {"version": 1, "loss": None, "accuracy": None}
