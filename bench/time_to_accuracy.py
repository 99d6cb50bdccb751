"""Time to a target accuracy: centralised training against fedq federations, side by side.

    python bench/time_to_accuracy.py                      # every scenario
    python bench/time_to_accuracy.py --scenarios demo     # one of: demo amqp slowdown dirichlet

Prints a table per scenario and ends with the ratios the project's targets are stated in.
Each federated run is a real `fedq run`; its run directory is kept under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.cli import main as fedq
from shared.datasets import dataset_shape, load_dataset, tensors_of
from shared.jobs import ModelSpec
from shared.models import build_model

AMQP = os.environ.get("FEDQ_BENCH_BROKER", "amqp://guest:guest@localhost:5672/")


def centralised(
    model_name: str,
    dataset: str,
    target: float,
    seed: int = 0,
    lr: float = 0.05,
    batch_size: int = 32,
    eval_every: int = 1000,
    max_epochs: int = 10,
) -> dict[str, Any]:
    """Train on all the data in one place; evaluate every `eval_every` samples (not timed)."""
    torch.set_num_threads(os.cpu_count() or 1)
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    x, y = tensors_of(train)
    xt, yt = tensors_of(test)
    shape, classes = dataset_shape(train)
    model = build_model(ModelSpec(model_name, tuple(shape), classes), seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    trained_s, seen, since_eval = 0.0, 0, 0
    best = 0.0
    for _epoch in range(max_epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), batch_size):
            t0 = time.perf_counter()
            model.train()
            idx = order[start : start + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            trained_s += time.perf_counter() - t0
            seen += len(idx)
            since_eval += len(idx)
            if since_eval >= eval_every:
                since_eval = 0
                model.eval()
                with torch.no_grad():
                    acc = float((model(xt).argmax(1) == yt).float().mean())
                best = max(best, acc)
                if acc >= target:
                    return {
                        "time_to_target_s": trained_s,
                        "epochs": seen / len(y),
                        "accuracy": acc,
                        "reached": True,
                    }
    return {"time_to_target_s": None, "epochs": max_epochs, "accuracy": best, "reached": False}


def federated(out: Path, *flags: str) -> dict[str, Any]:
    """Run `fedq run` quietly and return its summary."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = fedq(["run", "--out", str(out), "--quiet", *flags])
    if code != 0:
        raise SystemExit(f"fedq run failed: {buf.getvalue()}")
    return json.loads((out / "summary.json").read_text())


def row(name: str, s: dict[str, Any]) -> str:
    """One table row: time to target, final accuracy, versions, megabytes through the broker."""
    t = s.get("time_to_target_s")
    t_text = f"{t:8.1f}" if t is not None else "     n/a"
    moved = s.get("bytes_received", 0) + s.get("bytes_sent", 0)
    accuracy = 100 * (s.get("final_accuracy") or s.get("accuracy") or 0)
    versions = s.get("versions", "-")
    return f"| {name:<34} | {t_text} | {accuracy:6.2f} | {versions:>8} | {moved / 1e6:9.1f} |"


HEADER = (
    "| run                                | to target s | final % | versions | broker MB |\n"
    "|------------------------------------|----------|--------|----------|-----------|"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenarios", default="demo,amqp,slowdown,dirichlet")
    p.add_argument("--model", default="cnn")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--max-time", default="300")
    args = p.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(args.out) / stamp
    ratios: list[str] = []
    common = ["--model", args.model, "--dataset", "mnist5k", "--max-time", args.max_time]
    for scenario in args.scenarios.split(","):
        print(f"\n## {scenario}\n{HEADER}", flush=True)
        if scenario == "demo":
            c = centralised(args.model, "mnist5k", 0.95)
            print(row("centralised (2 threads)", c), flush=True)
            f = federated(
                base / "demo",
                "--workers",
                "4",
                "--strategy",
                "fedavg",
                "--target-accuracy",
                "0.95",
                *common,
            )
            print(row("fedavg, 4 workers, iid, memory", f), flush=True)
            if c["reached"] and f["reached_target"]:
                ratios.append(
                    f"demo: fedavg / centralised time to 95% = "
                    f"{f['time_to_target_s'] / c['time_to_target_s']:.2f} (target <= 3)"
                )
        elif scenario == "amqp":
            f = federated(
                base / "amqp",
                "--workers",
                "4",
                "--strategy",
                "fedavg",
                "--target-accuracy",
                "0.95",
                "--broker",
                AMQP,
                *common,
            )
            print(row("fedavg, 4 workers, iid, rabbitmq", f), flush=True)
            ratios.append(f"amqp: reached 95% = {f['reached_target']}")
        elif scenario == "slowdown":
            slow = ["--workers", "8", "--slowdown", "1,1,1,1,1,1,5,5", "--target-accuracy", "0.95"]
            a = federated(base / "slow-fedavg", "--strategy", "fedavg", *slow, *common)
            print(row("fedavg, 8 workers, slowdown 5x on 2", a), flush=True)
            b = federated(base / "slow-fedbuff", "--strategy", "fedbuff", *slow, *common)
            print(row("fedbuff, 8 workers, slowdown 5x on 2", b), flush=True)
            if a["reached_target"] and b["reached_target"]:
                ratios.append(
                    f"slowdown: fedavg / fedbuff time to 95% = "
                    f"{a['time_to_target_s'] / b['time_to_target_s']:.2f} (fedbuff sooner if > 1)"
                )
        elif scenario == "dirichlet":
            f = federated(
                base / "dirichlet",
                "--workers",
                "4",
                "--strategy",
                "fedavg",
                "--partition",
                "dirichlet:0.5",
                "--target-accuracy",
                "0.93",
                *common,
            )
            print(row("fedavg, 4 workers, dirichlet 0.5", f), flush=True)
            ratios.append(f"dirichlet: reached 93% = {f['reached_target']}")
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    print("\n## ratios")
    for line in ratios:
        print(f"- {line}")


if __name__ == "__main__":
    main()
