"""`fedq report RUN_DIR`: a PNG of a run's accuracy over time and its staleness distribution.

Needs matplotlib (`pip install 'fedq[report]'`); imported only when a report is drawn.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.errors import FedqError


def read_run(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(history lines, summary) of a run directory; FedqError when either is missing or bad."""
    history_path, summary_path = run_dir / "history.jsonl", run_dir / "summary.json"
    for path in (history_path, summary_path):
        if not path.is_file():
            raise FedqError(f"{path} not found: is {run_dir} a finished run directory?")
    try:
        history = [
            json.loads(line)
            for line in history_path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FedqError(f"{run_dir}: unreadable run files: {e}") from e
    if not history or not isinstance(summary, dict):
        raise FedqError(f"{run_dir}: empty history.jsonl or summary.json")
    return history, summary


def staleness_values(history: list[dict[str, Any]]) -> tuple[list[float], str]:
    """Per-update staleness when the history records it, else each version's mean staleness."""
    if any("staleness" in h for h in history):
        return [float(s) for h in history for s in h.get("staleness", [])], "per update"
    means = [float(h["mean_staleness"]) for h in history if h.get("updates")]
    return means, "mean per version"


def draw(history: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    """Write the two-panel PNG."""
    try:
        import matplotlib
    except ImportError as e:
        raise FedqError("fedq report needs matplotlib: pip install 'fedq[report]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (acc_ax, st_ax) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    title = (
        f"{summary.get('job_id', '?')}: {summary.get('strategy', '?')}, "
        f"{summary.get('model', '?')}, {summary.get('versions', '?')} versions"
    )
    fig.suptitle(title)

    evaluated = [h for h in history if h.get("accuracy") is not None]
    times = [float(h["time_s"]) for h in evaluated]
    accuracies = [float(h["accuracy"]) for h in evaluated]
    versions = [int(h["version"]) for h in evaluated]
    acc_ax.plot(times, accuracies, color="0.6", linewidth=1, zorder=1)
    points = acc_ax.scatter(
        times, accuracies, c=versions, cmap="viridis", s=28, zorder=2, label="evaluated version"
    )
    fig.colorbar(points, ax=acc_ax, label="model version", ticks=MaxNLocator(integer=True))
    target = summary.get("target_accuracy")
    if target is not None:
        acc_ax.axhline(float(target), color="tab:red", linestyle="--", label=f"target {target}")
    reached = summary.get("time_to_target_s")
    if reached is not None:
        acc_ax.axvline(
            float(reached), color="tab:red", linestyle=":", label=f"reached {reached:.1f} s"
        )
    acc_ax.set_xlabel("time since the job started (s)")
    acc_ax.set_ylabel("held-out accuracy")
    acc_ax.set_title("accuracy over time")
    acc_ax.set_ylim(0, 1)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right")

    values, kind = staleness_values(history)
    if values:
        top = max(values)
        bins = [b - 0.5 for b in range(int(top) + 2)] if kind == "per update" else 20
        st_ax.hist(values, bins=bins, color="tab:blue", edgecolor="white", rwidth=0.9)
        if kind == "per update":
            st_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        mean = sum(values) / len(values)
        st_ax.axvline(mean, color="tab:orange", linestyle="--", label=f"mean {mean:.2f}")
        st_ax.legend(loc="best")
    else:
        st_ax.text(0.5, 0.5, "no updates folded", ha="center", va="center")
    st_ax.set_xlabel("staleness (versions behind)")
    st_ax.set_ylabel("updates" if kind == "per update" else "versions")
    st_ax.set_title(f"staleness distribution ({kind}, {len(values)} values)")
    st_ax.grid(alpha=0.3, axis="y")

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)


def report_main(argv: Sequence[str] | None = None) -> int:
    """`fedq report RUN_DIR [--out PNG]`: draw the report and print its path."""
    parser = argparse.ArgumentParser(prog="fedq report")
    parser.add_argument("run_dir", help="a run directory with history.jsonl and summary.json")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/report.png)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    history, summary = read_run(run_dir)
    out = Path(args.out) if args.out else run_dir / "report.png"
    draw(history, summary, out)
    print(out)
    return 0
