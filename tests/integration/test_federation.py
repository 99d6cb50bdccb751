"""Whole federations on the in-process broker, as `fedq run` starts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aggregator.cli import main


def _run(tmp_path: Path, *flags: str) -> tuple[dict, list[dict]]:
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--quiet", *flags])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return summary, history


@pytest.mark.timeout(240)
def test_an_embedded_fedavg_federation_reaches_90_percent_on_mnist5k(tmp_path: Path) -> None:
    summary, history = _run(
        tmp_path,
        "--workers",
        "4",
        "--strategy",
        "fedavg",
        "--model",
        "cnn",
        "--dataset",
        "mnist5k",
        "--target-accuracy",
        "0.9",
        "--max-time",
        "180",
    )

    assert summary["reached_target"] is True
    assert summary["final_accuracy"] >= 0.9
    assert summary["updates_rejected"] == 0
    assert (tmp_path / "run" / "model.safetensors").stat().st_size > 1_000_000
    # Every synchronous round folds in one update from each of the four workers.
    assert [h["updates"] for h in history[1:]] == [4] * (len(history) - 1)
    assert history[0]["version"] == 0 and history[-1]["version"] == summary["versions"]


@pytest.mark.timeout(240)
def test_an_embedded_fedbuff_federation_learns_and_accounts_for_every_update(
    tmp_path: Path,
) -> None:
    summary, history = _run(
        tmp_path,
        "--workers",
        "3",
        "--strategy",
        "fedbuff",
        "--buffer-size",
        "2",
        "--model",
        "cnn",
        "--dataset",
        "digits",
        "--max-versions",
        "6",
        "--seed",
        "1",
    )

    assert summary["versions"] == 6
    assert summary["final_accuracy"] > history[0]["accuracy"] + 0.2
    folded = [uid for h in history for uid in h["update_ids"]]
    assert len(folded) == len(set(folded)) == 12
