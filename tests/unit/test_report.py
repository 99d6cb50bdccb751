"""`fedq report RUN_DIR`: a PNG from history.jsonl and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aggregator.cli import main
from aggregator.report import staleness_values

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_dir(path: Path, *, per_update: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for version in range(21):
        staleness = [(version * 7 + k) % 4 for k in range(3)] if version else []
        line = {
            "version": version,
            "round": None,
            "time_s": version * 0.8,
            "accuracy": None if version % 2 else min(0.95, 0.1 + 0.05 * version),
            "loss": None,
            "updates": len(staleness),
            "mean_staleness": sum(staleness) / len(staleness) if staleness else 0.0,
            "max_staleness": max(staleness, default=0),
        }
        if per_update:
            line["staleness"] = staleness
        lines.append(json.dumps(line))
    (path / "history.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {
        "job_id": "demo-1",
        "strategy": "fedbuff",
        "model": "mlp",
        "versions": 20,
        "target_accuracy": 0.8,
        "time_to_target_s": 11.2,
    }
    (path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return path


@pytest.mark.parametrize("per_update", [True, False])
def test_report_writes_a_png(tmp_path: Path, per_update: bool) -> None:
    pytest.importorskip("matplotlib")
    run_dir = _run_dir(tmp_path / "run", per_update=per_update)
    out = tmp_path / "out" / "report.png"

    assert main(["report", str(run_dir), "--out", str(out)]) == 0

    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 20_000


def test_report_defaults_to_the_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    run_dir = _run_dir(tmp_path / "run")

    assert main(["report", str(run_dir)]) == 0

    assert (run_dir / "report.png").read_bytes().startswith(PNG_MAGIC)
    assert capsys.readouterr().out.strip() == str(run_dir / "report.png")


@pytest.mark.parametrize("missing", ["history.jsonl", "summary.json"])
def test_a_missing_run_file_is_a_clear_error(
    tmp_path: Path, missing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _run_dir(tmp_path / "run")
    (run_dir / missing).unlink()

    assert main(["report", str(run_dir)]) == 1

    err = capsys.readouterr().err
    assert err.startswith("fedq report: ") and missing in err
    assert not (run_dir / "report.png").exists()


def test_a_corrupt_history_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _run_dir(tmp_path / "run")
    (run_dir / "history.jsonl").write_text("{not json\n", encoding="utf-8")

    assert main(["report", str(run_dir)]) == 1
    assert "unreadable run files" in capsys.readouterr().err


def test_without_matplotlib_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _run_dir(tmp_path / "run")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)

    assert main(["report", str(run_dir)]) == 1
    assert "pip install 'fedq[report]'" in capsys.readouterr().err


def test_staleness_is_per_update_when_recorded_else_the_version_means() -> None:
    history = [
        {"updates": 0, "mean_staleness": 0.0, "staleness": []},
        {"updates": 2, "mean_staleness": 1.5, "staleness": [1, 2]},
    ]
    assert staleness_values(history) == ([1.0, 2.0], "per update")
    for h in history:
        del h["staleness"]
    assert staleness_values(history) == ([1.5], "mean per version")
