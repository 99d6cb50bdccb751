"""Time to a target accuracy: centralised training against fedq federations, side by side.

    python bench/time_to_accuracy.py                      # the issue-5 matrix (below)
    python bench/time_to_accuracy.py --scenarios demo     # or amqp, slowdown, dirichlet (older)
    python bench/time_to_accuracy.py --workers 2 --partitions iid --slowdowns "none;1,5" \\
        --strategies fedavg,fedbuff --max-time 20         # a smoke run
    python bench/time_to_accuracy.py --replot runs/bench/STAMP/results.json

The matrix: centralised training once (timed to every target, evaluation not timed), then for
each partition (iid, dirichlet:0.5) x slowdown (none; 1,1,1,1,1,1,5,5) x strategy (fedavg,
fedbuff, fedasync) a real `fedq run --workers 8` of the CNN on mnist5k, in-process broker
unless --broker amqp://..., stopped at the target (0.95 IID, 0.93 non-IID) or --max-time.
--slowdowns entries are separated by ';' because each one is a comma-separated factor list.

Strategy parameters (passed explicitly, so the bench does not move when defaults do):
- fedavg: every worker in every round (fraction 1), the server waits for all of them; this is
  the synchronous baseline that stragglers hold back.
- fedbuff: K = workers // 2 (4 of 8), server learning rate 1.0, staleness weight
  1 / sqrt(1 + s) (polynomial, a = 0.5): FedBuff's paper (Nguyen et al., 2022) sets K well
  below the concurrency and weights by 1 / sqrt(1 + s); K at half the workers lets a version
  form from the six fast workers alone while still averaging out single-update noise.
- fedasync: alpha 0.6 with the same polynomial staleness (a = 0.5), the setting of FedAsync's
  paper (Xie et al., 2019); every update makes a version.
- all: one local epoch of SGD (lr 0.05, momentum 0.9, batch 32), the job defaults; max
  versions 1000 so that time, not the version count, ends a run that misses its target.

Prints a table per (partition, slowdown) and ends with "## ratios". Every run directory is
kept under --out/STAMP, with results.json (all figures, for docs) and PNGs of accuracy against
wall-clock (one per partition/slowdown, one per strategy) in --plots-dir (default the same).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.cli import main as fedq
from aggregator.federation import slowdowns as parse_factors
from shared.datasets import dataset_shape, load_dataset, tensors_of
from shared.errors import ConfigError
from shared.jobs import ModelSpec
from shared.models import build_model

AMQP = os.environ.get("FEDQ_BENCH_BROKER", "amqp://guest:guest@localhost:5672/")
STRATEGIES = ("fedavg", "fedbuff", "fedasync")
COLOURS = {"fedavg": "tab:blue", "fedbuff": "tab:orange", "fedasync": "tab:green"}


# ---------------------------------------------------------------- measuring


def centralised(
    model_name: str,
    dataset: str,
    targets: Sequence[float],
    seed: int = 0,
    lr: float = 0.05,
    batch_size: int = 32,
    eval_every: int = 1000,
    max_epochs: int = 10,
) -> dict[str, Any]:
    """Train on all the data in one place until every target is reached (or max_epochs).

    Evaluates every `eval_every` samples, not timed; returns the training seconds and accuracy at
    which each target was first reached ("reached": {"0.95": {"time_s", "accuracy"} | None}) and
    the accuracy curve.
    """
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    x, y = tensors_of(train)
    xt, yt = tensors_of(test)
    shape, classes = dataset_shape(train)
    model = build_model(ModelSpec(model_name, tuple(shape), classes), seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    reached: dict[str, dict[str, float] | None] = {f"{t:g}": None for t in targets}
    curve: list[list[float]] = []
    trained_s, seen, since_eval = 0.0, 0, 0
    for _epoch in range(max_epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), batch_size):
            t0 = time.perf_counter()
            model.train()
            idx = order[start : start + batch_size]
            opt.zero_grad()
            torch.autograd.backward(F.cross_entropy(model(x[idx]), y[idx]))
            opt.step()
            trained_s += time.perf_counter() - t0
            seen, since_eval = seen + len(idx), since_eval + len(idx)
            if since_eval < eval_every:
                continue
            since_eval = 0
            model.eval()
            with torch.no_grad():
                acc = float((model(xt).argmax(1) == yt).float().mean())
            curve.append([round(trained_s, 3), acc])
            for t in targets:
                if reached[f"{t:g}"] is None and acc >= t:
                    reached[f"{t:g}"] = {"time_s": trained_s, "accuracy": acc}
            if all(reached.values()):
                break
        if all(reached.values()):
            break
    return {"threads": threads, "epochs": seen / len(y), "reached": reached, "curve": curve}


def centralised_summary(c: dict[str, Any], target: float) -> dict[str, Any]:
    """Centralised training to one target in the shape of a run's summary.json."""
    hit = c["reached"].get(f"{target:g}")
    best = max((acc for _t, acc in c["curve"]), default=0.0)
    return {
        "time_to_target_s": hit["time_s"] if hit else None,
        "final_accuracy": hit["accuracy"] if hit else best,
        "versions": "-",
    }


class RunFailed(Exception):
    """A `fedq run` that exited non-zero (its own error is on stderr)."""


def federated(out: Path, *flags: str) -> dict[str, Any]:
    """Run `fedq run` quietly and return its summary; RunFailed when it fails."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = fedq(["run", "--out", str(out), "--quiet", *flags])
    if code != 0:
        raise RunFailed(f"fedq run failed (exit {code}) in {out}: {buf.getvalue().strip()}")
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


# ---------------------------------------------------------------- printing


def row(name: str, s: dict[str, Any]) -> str:
    """One table row: time to target, final accuracy, versions, megabytes through the broker."""
    t = s.get("time_to_target_s")
    t_text = f"{t:11.1f}" if t is not None else "        n/a"
    moved = s.get("bytes_received", 0) + s.get("bytes_sent", 0)
    accuracy = 100 * (s.get("final_accuracy") or s.get("accuracy") or 0)
    versions = s.get("versions", "-")
    return f"| {name:<34} | {t_text} | {accuracy:7.2f} | {versions:>8} | {moved / 1e6:9.1f} |"


HEADER = (
    "| run                                | to target s | final % | versions | broker MB |\n"
    "|------------------------------------|-------------|---------|----------|-----------|"
)


# ---------------------------------------------------------------- the matrix


def slowdown_entries(text: str, workers: int) -> list[str]:
    """The --slowdowns entries ('none' or factor lists), each checked against the worker count."""
    entries = [e.strip() for e in text.split(";") if e.strip()]
    for entry in entries:
        if entry == "none":
            continue
        try:
            parse_factors(entry, workers)
        except ConfigError as e:
            raise SystemExit(
                f"--slowdowns entry {entry!r} with {workers} workers: {e}; "
                "entries are separated by ';', e.g. --slowdowns 'none;1,5'"
            ) from e
    return entries


def slowdown_label(entry: str) -> str:
    """Human name of a slowdown entry."""
    return "no slowdown" if entry == "none" else f"slowdown {entry}"


def cell_slug(partition: str, entry: str) -> str:
    """File-name-safe name of one (partition, slowdown) cell."""
    slow = "noslow" if entry == "none" else "slow" + entry.replace(",", "-")
    return f"{partition.replace(':', '')}-{slow}"


def target_for(partition: str, args: argparse.Namespace) -> float:
    """The accuracy target of a partition: the IID one, or the lower non-IID one."""
    return float(args.target_iid if partition == "iid" else args.target_noniid)


def strategy_flags(strategy: str, args: argparse.Namespace) -> list[str]:
    """The strategy's parameters as `fedq run` flags (see the module docstring for why)."""
    if strategy == "fedbuff":
        k = args.buffer_size or max(1, args.workers // 2)
        return ["--buffer-size", str(k), "--server-lr", str(args.server_lr), *staleness(args)]
    if strategy == "fedasync":
        return ["--alpha", str(args.alpha), *staleness(args)]
    return []


def staleness(args: argparse.Namespace) -> list[str]:
    """The staleness weighting flags shared by the asynchronous strategies."""
    return ["--staleness", args.staleness]


def run_cell(
    args: argparse.Namespace, base: Path, partition: str, entry: str, strategy: str
) -> dict[str, Any]:
    """One `fedq run` of the matrix; its figures as a results.json record."""
    target = target_for(partition, args)
    run_dir = base / f"{cell_slug(partition, entry)}-{strategy}"
    flags = ["--workers", str(args.workers), "--strategy", strategy]
    flags += ["--model", args.model, "--dataset", args.dataset, "--partition", partition]
    flags += ["--target-accuracy", str(target), "--max-time", str(args.max_time)]
    flags += ["--max-versions", str(args.max_versions), "--broker", args.broker]
    flags += ["--seed", str(args.seed), *strategy_flags(strategy, args)]
    if entry != "none":
        flags += ["--slowdown", entry]
    record: dict[str, Any] = {
        "partition": partition,
        "slowdown": entry,
        "strategy": strategy,
        "target": target,
        "run_dir": str(run_dir),
        # The broker URL may hold a password: results.json keeps only its scheme.
        "flags": [f if f != args.broker else args.broker.split(":")[0] for f in flags],
    }
    try:
        s = federated(run_dir, *flags)
    except RunFailed as e:
        # One broken run should not cost the rest of a long matrix.
        return record | {"error": str(e), "time_to_target_s": None, "wall_time_s": None}
    return record | {
        "reached_target": s["reached_target"],
        "time_to_target_s": s["time_to_target_s"],
        "final_accuracy": s["final_accuracy"],
        "best_accuracy": s["best_accuracy"],
        "versions": s["versions"],
        "stop_reason": s["stop_reason"],
        "wall_time_s": s["wall_time_s"],
        "bytes_received": s["bytes_received"],
        "bytes_sent": s["bytes_sent"],
    }


def run_matrix(args: argparse.Namespace, base: Path) -> list[str]:
    """Centralised once, then every (partition, slowdown, strategy); returns the ratio lines."""
    partitions = [p.strip() for p in args.partitions.split(",") if p.strip()]
    entries = slowdown_entries(args.slowdowns, args.workers)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if unknown := set(strategies) - set(STRATEGIES):
        raise SystemExit(f"unknown strategies {sorted(unknown)}; choose from {STRATEGIES}")
    targets = sorted({target_for(p, args) for p in partitions})
    results: dict[str, Any] = {"config": matrix_config(args, partitions, entries, strategies)}
    c = centralised(args.model, args.dataset, targets, seed=args.seed)
    results["centralised"], results["runs"] = c, []
    write_results(base, results)
    for partition in partitions:
        for entry in entries:
            target = target_for(partition, args)
            print(f"\n## {partition}, {slowdown_label(entry)}, to {target:.0%}", flush=True)
            print(HEADER)
            print(row(f"centralised ({c['threads']} threads)", centralised_summary(c, target)))
            for strategy in strategies:
                record = run_cell(args, base, partition, entry, strategy)
                results["runs"].append(record)
                write_results(base, results)
                print(row(f"{strategy}, {args.workers} workers", record), flush=True)
                if "error" in record:
                    print(f"  ({strategy} failed: {record['error']})", flush=True)
    results["ratios"] = matrix_ratios(results, partitions, entries)
    write_results(base, results)
    if not args.no_plots:
        results["plots"] = [str(p) for p in draw_plots(results, Path(args.plots_dir or base))]
        write_results(base, results)
    return [r["text"] for r in results["ratios"]]


def matrix_config(
    args: argparse.Namespace, partitions: list[str], entries: list[str], strategies: list[str]
) -> dict[str, Any]:
    """What the matrix ran with, for results.json."""
    return {
        "model": args.model,
        "dataset": args.dataset,
        "workers": args.workers,
        "partitions": partitions,
        "slowdowns": entries,
        "strategies": strategies,
        "targets": {p: target_for(p, args) for p in partitions},
        "max_time_s": args.max_time,
        "max_versions": args.max_versions,
        "broker": "memory" if args.broker == "memory" else "amqp",
        "strategy_flags": {s: strategy_flags(s, args) for s in strategies},
        "seed": args.seed,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_results(base: Path, results: dict[str, Any]) -> None:
    """(Re)write results.json; after every run, so an interrupted matrix keeps what it measured."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- ratios


def find_run(results: dict[str, Any], partition: str, entry: str, strategy: str) -> Any:
    """The record of one run of the matrix, or None when it was not run."""
    for r in results["runs"]:
        if (r["partition"], r["slowdown"], r["strategy"]) == (partition, entry, strategy):
            return r
    return None


def ratio(
    name: str, slow: dict[str, Any] | None, fast: dict[str, Any] | None, goal: str | None
) -> dict[str, Any] | None:
    """slow / fast time to target, with a lower bound when only `fast` reached it.

    `goal` is ">= X" or "<= X"; `met` says whether the value (or its bound) satisfies it.
    """
    if slow is None or fast is None:
        return None
    if failed := [r["label"] for r in (slow, fast) if r.get("error")]:
        return {
            "name": name,
            "value": None,
            "lower_bound": False,
            "goal": goal,
            "met": None,
            "text": f"{name} = n/a ({' and '.join(failed)} failed)",
        }
    value, bound = None, False
    if fast["time_to_target_s"] is not None:
        if slow["time_to_target_s"] is not None:
            value = slow["time_to_target_s"] / fast["time_to_target_s"]
        elif slow.get("wall_time_s") is not None:
            value, bound = slow["wall_time_s"] / fast["time_to_target_s"], True
    met = None
    if value is not None and goal is not None:
        op, limit = goal.split()
        ok = value >= float(limit) if op == ">=" else value <= float(limit)
        # A lower bound settles ">=" only when it passes and "<=" only when it fails.
        met = ok if not bound or ok == (op == ">=") else None
    notes = []
    if bound:
        notes.append(f"{slow['label']} did not reach the target in {slow['wall_time_s']:.0f} s")
    elif value is None:
        notes.append(f"{fast['label']} did not reach the target")
    if goal is not None:
        notes.append(f"target {goal}" + ("" if met is None else f": {'met' if met else 'missed'}"))
    shown = "n/a" if value is None else f"{'> ' if bound else ''}{value:.2f}"
    text = f"{name} = {shown}" + (f" ({'; '.join(notes)})" if notes else "")
    return {
        "name": name,
        "value": value,
        "lower_bound": bound,
        "goal": goal,
        "met": met,
        "text": text,
    }


def matrix_ratios(
    results: dict[str, Any], partitions: list[str], entries: list[str]
) -> list[dict[str, Any]]:
    """The issue's ratios: fedavg against fedbuff/fedasync with slowdown, against centralised."""
    out: list[dict[str, Any] | None] = []
    for partition in partitions:
        for entry in entries:
            runs = {s: find_run(results, partition, entry, s) for s in STRATEGIES}
            for s, r in runs.items():
                if r is not None:
                    r["label"] = s
            if entry == "none":
                target = float(results["config"]["targets"][partition])
                c = centralised_summary(results["centralised"], target)
                c["label"], c["wall_time_s"] = "centralised", None
                goal = "<= 3" if partition == "iid" else None
                name = f"{partition}, no slowdown: fedavg / centralised time to target"
                out.append(ratio(name, runs["fedavg"], c, goal))
                continue
            where = f"{partition}, {slowdown_label(entry)}"
            name = f"{where}: fedavg / fedbuff time to target"
            out.append(ratio(name, runs["fedavg"], runs["fedbuff"], ">= 2.5"))
            name = f"{where}: fedavg / fedasync time to target"
            out.append(ratio(name, runs["fedavg"], runs["fedasync"], None))
    for r in results["runs"]:
        r.pop("label", None)
    return [r for r in out if r is not None]


# ---------------------------------------------------------------- plots


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a clear exit when the report extra is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit(
            "the bench's plots need matplotlib: pip install 'fedq[report]' (or pass --no-plots)"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_curve(run_dir: str) -> tuple[list[float], list[float]]:
    """(seconds, accuracy) of every evaluated version in a run's history.jsonl."""
    path = Path(run_dir) / "history.jsonl"
    if not path.is_file():
        return [], []
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    evaluated = [h for h in lines if h.get("accuracy") is not None]
    return [float(h["time_s"]) for h in evaluated], [float(h["accuracy"]) for h in evaluated]


def mark_centralised(ax: Any, c: dict[str, Any], target: float, colour: str = "tab:red") -> None:
    """The target as a horizontal line and centralised's time to it as a vertical one."""
    ax.axhline(target, color=colour, linestyle="--", linewidth=1, label=f"target {target:.0%}")
    hit = c["reached"].get(f"{target:g}")
    if hit is not None:
        ax.axvline(
            hit["time_s"],
            color=colour,
            linestyle=":",
            linewidth=1.2,
            label=f"centralised to {target:.0%}: {hit['time_s']:.1f} s",
        )


def floor(targets: Sequence[float]) -> float:
    """The bottom of the accuracy axis: the climb to the target shows, the end is not squashed."""
    return max(0.0, round(min(targets) - 0.35, 1))


def finish(ax: Any, fig: Any, title: str, path: Path, low: float) -> Path:
    """Axis labels, limits, legend; save the PNG and close the figure."""
    ax.set_title(title)
    ax.set_xlabel("wall-clock seconds since the first tasks (centralised: training seconds)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(low, 1.0)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_cell(plt: Any, results: dict[str, Any], partition: str, entry: str, out: Path) -> Path:
    """Accuracy against wall-clock of every strategy in one (partition, slowdown) cell."""
    c, cfg = results["centralised"], results["config"]
    target = float(cfg["targets"][partition])
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    times, accs = zip(*c["curve"], strict=True) if c["curve"] else ((), ())
    ax.plot(times, accs, color="0.5", linestyle="--", linewidth=1, label="centralised")
    for strategy in cfg["strategies"]:
        r = find_run(results, partition, entry, strategy)
        if r is None:
            continue
        xs, ys = accuracy_curve(r["run_dir"])
        ax.plot(xs, ys, marker=".", color=COLOURS[strategy], label=strategy)
        if r["time_to_target_s"] is not None:
            ax.plot([r["time_to_target_s"]], [target], marker="o", color=COLOURS[strategy])
    mark_centralised(ax, c, target)
    title = f"{cfg['model']} on {cfg['dataset']}, {cfg['workers']} workers, {partition}, "
    title += slowdown_label(entry)
    path = finish(
        ax, fig, title, out / f"accuracy-{cell_slug(partition, entry)}.png", floor([target])
    )
    plt.close(fig)
    return path


def plot_strategy(plt: Any, results: dict[str, Any], strategy: str, out: Path) -> Path:
    """Accuracy against wall-clock of one strategy in every (partition, slowdown) cell."""
    c, cfg = results["centralised"], results["config"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    colours = ["tab:blue", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink"]
    for i, partition in enumerate(cfg["partitions"]):
        for entry in cfg["slowdowns"]:
            r = find_run(results, partition, entry, strategy)
            if r is None:
                continue
            xs, ys = accuracy_curve(r["run_dir"])
            style = "-" if entry == "none" else "--"
            label = f"{partition}, {slowdown_label(entry)}"
            ax.plot(xs, ys, style, marker=".", color=colours[i % len(colours)], label=label)
    targets = sorted(set(cfg["targets"].values()), reverse=True)
    for target, colour in zip(targets, ["tab:red", "tab:pink", "tab:gray"], strict=False):
        mark_centralised(ax, c, float(target), colour)
    title = f"{strategy}: {cfg['model']} on {cfg['dataset']}, {cfg['workers']} workers"
    path = finish(ax, fig, title, out / f"accuracy-{strategy}.png", floor(targets))
    plt.close(fig)
    return path


def draw_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Every PNG of the matrix: one per (partition, slowdown), one per strategy."""
    plt = pyplot()
    cfg = results["config"]
    paths = [
        plot_cell(plt, results, partition, entry, out)
        for partition in cfg["partitions"]
        for entry in cfg["slowdowns"]
    ]
    paths += [plot_strategy(plt, results, strategy, out) for strategy in cfg["strategies"]]
    print("\n## plots\n" + "\n".join(f"- {p}" for p in paths))
    return paths


# ---------------------------------------------------------------- older scenarios


def scenario_demo(args: argparse.Namespace, base: Path, common: list[str]) -> list[str]:
    """fedavg with 4 IID workers against centralised, to 95%."""
    c = centralised_summary(centralised(args.model, args.dataset, [0.95]), 0.95)
    print(row(f"centralised ({os.cpu_count() or 1} threads)", c), flush=True)
    flags = ["--workers", "4", "--strategy", "fedavg", "--target-accuracy", "0.95", *common]
    f = federated(base / "demo", *flags)
    print(row("fedavg, 4 workers, iid, memory", f), flush=True)
    if c["time_to_target_s"] is None or not f["reached_target"]:
        return []
    return [
        f"demo: fedavg / centralised time to 95% = "
        f"{f['time_to_target_s'] / c['time_to_target_s']:.2f} (target <= 3)"
    ]


def scenario_amqp(args: argparse.Namespace, base: Path, common: list[str]) -> list[str]:
    """fedavg with 4 workers as separate processes over RabbitMQ."""
    flags = ["--workers", "4", "--strategy", "fedavg", "--target-accuracy", "0.95"]
    f = federated(base / "amqp", *flags, "--broker", AMQP, *common)
    print(row("fedavg, 4 workers, iid, rabbitmq", f), flush=True)
    return [f"amqp: reached 95% = {f['reached_target']}"]


def scenario_slowdown(args: argparse.Namespace, base: Path, common: list[str]) -> list[str]:
    """fedavg against fedbuff with two of eight workers 5x slower."""
    slow = ["--workers", "8", "--slowdown", "1,1,1,1,1,1,5,5", "--target-accuracy", "0.95"]
    a = federated(base / "slow-fedavg", "--strategy", "fedavg", *slow, *common)
    print(row("fedavg, 8 workers, slowdown 5x on 2", a), flush=True)
    b = federated(base / "slow-fedbuff", "--strategy", "fedbuff", *slow, *common)
    print(row("fedbuff, 8 workers, slowdown 5x on 2", b), flush=True)
    if not (a["reached_target"] and b["reached_target"]):
        return []
    return [
        f"slowdown: fedavg / fedbuff time to 95% = "
        f"{a['time_to_target_s'] / b['time_to_target_s']:.2f} (fedbuff sooner if > 1)"
    ]


def scenario_dirichlet(args: argparse.Namespace, base: Path, common: list[str]) -> list[str]:
    """fedavg with 4 workers on Dirichlet(0.5) shares, to 93%."""
    flags = ["--workers", "4", "--strategy", "fedavg", "--partition", "dirichlet:0.5"]
    f = federated(base / "dirichlet", *flags, "--target-accuracy", "0.93", *common)
    print(row("fedavg, 4 workers, dirichlet 0.5", f), flush=True)
    return [f"dirichlet: reached 93% = {f['reached_target']}"]


SCENARIOS = {
    "demo": scenario_demo,
    "amqp": scenario_amqp,
    "slowdown": scenario_slowdown,
    "dirichlet": scenario_dirichlet,
}


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The bench's flags; the defaults are the issue's matrix."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenarios", default="matrix", help="matrix, or older: " + " ".join(SCENARIOS))
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--partitions", default="iid,dirichlet:0.5", help="comma-separated")
    p.add_argument("--slowdowns", default="none;1,1,1,1,1,1,5,5", help="';'-separated")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    p.add_argument("--target-iid", type=float, default=0.95)
    p.add_argument("--target-noniid", type=float, default=0.93, help="every non-iid partition")
    p.add_argument("--max-time", type=float, default=240.0, help="seconds per federated run")
    p.add_argument("--max-versions", type=int, default=1000)
    p.add_argument("--buffer-size", type=int, default=0, help="FedBuff K (0: workers // 2)")
    p.add_argument("--server-lr", type=float, default=1.0, help="FedBuff server learning rate")
    p.add_argument("--alpha", type=float, default=0.6, help="FedAsync mixing weight")
    p.add_argument("--staleness", default="polynomial", choices=["constant", "polynomial", "hinge"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--broker", default="memory", help="memory | amqp://... (separate processes)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--plots-dir", help="default: the run's output folder")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--replot", metavar="RESULTS_JSON", help="only redraw a finished matrix's PNGs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen scenarios and print the ratios."""
    args = parse_args(argv)
    if args.replot:
        results = json.loads(Path(args.replot).read_text(encoding="utf-8"))
        draw_plots(results, Path(args.plots_dir or Path(args.replot).parent))
        return
    if not args.no_plots:
        pyplot()  # fail now, not after the runs
    base = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    print(f"output: {base}", flush=True)
    common = ["--model", args.model, "--dataset", args.dataset, "--max-time", str(args.max_time)]
    ratios: list[str] = []
    for scenario in args.scenarios.split(","):
        if scenario == "matrix":
            ratios += run_matrix(args, base)
        elif scenario in SCENARIOS:
            print(f"\n## {scenario}\n{HEADER}", flush=True)
            try:
                ratios += SCENARIOS[scenario](args, base, common)
            except RunFailed as e:
                raise SystemExit(str(e)) from e
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    print("\n## ratios")
    for line in ratios:
        print(f"- {line}")
    if "matrix" in args.scenarios.split(","):
        print(f"\nresults: {base / 'results.json'}")


if __name__ == "__main__":
    main()
