"""Memory: the aggregator's peak RSS with 10 and with 100 lightweight workers on the same model.

    .venv/bin/python bench/memory.py [--workers 10,100] [--seconds 45] [--model cnn]
        [--think-ms 200,1000] [--trace]

Issue 5, benchmark 4: memory must grow with the model, not with the number of workers; the
target is peak(100 workers) / peak(10 workers) <= 1.2. Each size is one run of bench/load.py
(the real aggregator in its own process, lightweight workers that answer tasks with synthetic
updates without training, every update accounted for) on the FedAvg CNN over mnist5k (1.66M
parameters, 6.7 MB an update: a tiny model would make the ratio meaningless), strategy fedbuff,
for the same number of seconds. The peak is the kernel's high-water mark (VmHWM of
/proc/<pid>/status, read before the aggregator is stopped), next to the highest RSS sampled
once a second. With --trace the aggregator runs under tracemalloc, and the Python allocations
held at its traced peak are printed by line (numpy arrays and bytes count; torch tensors do not).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load  # bench/ is not a package: found through sys.path

TARGET_RATIO = 1.2

# Runs `python -m aggregator` with its flags, tracing from after the imports, snapshotting
# tracemalloc whenever the traced memory reaches a new high (checked every half second), and
# prints that snapshot at exit.
TRACE_LAUNCHER = r"""
import runpy, sys, threading, time, tracemalloc
import aggregator.cli  # torch and the rest: imported untraced, tracing them takes minutes
tracemalloc.start(12)
best = [0, None]
def watch():
    while True:
        current, _ = tracemalloc.get_traced_memory()
        if current > best[0] * 1.02:
            best[:] = [current, tracemalloc.take_snapshot()]
        time.sleep(0.5)
threading.Thread(target=watch, daemon=True).start()
try:
    runpy.run_module("aggregator", run_name="__main__", alter_sys=True)
finally:
    current, peak = tracemalloc.get_traced_memory()
    print(f"TRACE traced peak {peak / 2**20:.1f} MiB, at the snapshot {best[0] / 2**20:.1f} MiB",
          flush=True)
    if best[1] is not None:
        snap = best[1].filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        for stat in snap.statistics("traceback")[:12]:
            print(f"TRACE {stat.size / 2**20:8.1f} MiB in {stat.count} blocks", flush=True)
            for line in stat.traceback.format()[-8:]:
                print("TRACE   " + line, flush=True)
"""


@dataclass
class Row:
    """One size's figures."""

    workers: int
    seconds: float
    peak_kib: int  # VmHWM
    sampled_max_kib: int
    start_kib: int
    folded: int
    received: int
    versions: int
    rejected: int
    lost: int
    tasks: int
    bad: bool
    run_dir: Path


def measure(args: argparse.Namespace, workers: int) -> Row:
    """One load run with `workers` lightweight workers; its memory figures."""
    argv = [
        "--workers", str(workers),
        "--seconds", str(args.seconds),
        "--strategy", args.strategy,
        "--model", args.model,
        "--broker", args.broker,
        "--think-ms", args.think_ms,
        "--procs", str(max(1, min(args.procs, workers))),
        "--buffer-size", str(args.buffer_size),
        "--eval-every", str(args.eval_every),
        "--out", args.out,
        "--quiet",
    ]  # fmt: skip
    load_args = load.build_parser().parse_args(argv)
    if args.trace:
        load_args.aggregator_launcher = ["-c", TRACE_LAUNCHER]
    outcome = load.execute(load_args)
    a, rows = outcome.accounts, outcome.samples.rows
    rss = [s.rss_kib for s in rows if s.rss_kib]
    row = Row(
        workers=workers,
        seconds=outcome.figures.window.seconds,
        peak_kib=outcome.figures.peak_rss_kib,
        sampled_max_kib=max(rss, default=0),
        start_kib=rss[0] if rss else 0,
        folded=len(a.folded),
        received=max((s.received for s in rows), default=0),
        versions=a.versions,
        rejected=len(set(a.rejected) - set(a.folded)),
        lost=len(a.lost),
        tasks=sum(r["tasks"] for r in outcome.workers),
        bad=outcome.bad,
        run_dir=outcome.run_dir,
    )
    if args.trace:
        log = (outcome.run_dir / "aggregator.log").read_text(errors="replace")
        print(f"\n### tracemalloc, {workers} workers\n```")
        print("\n".join(line[6:] for line in log.splitlines() if line.startswith("TRACE")))
        print("```", flush=True)
    return row


def mib(kib: int) -> str:
    """KiB as MiB, no decimals."""
    return f"{kib / 1024:.0f}"


def report(args: argparse.Namespace, rows: list[Row]) -> bool:
    """Print the table and the ratio; whether the target was met."""
    low, high = args.think_ms.split(",")[0], args.think_ms.split(",")[-1]
    print(
        f"\n## aggregator memory: {args.model} on {load.MODELS[args.model][1]}, {args.strategy} "
        f"buffer {args.buffer_size}, eval every {args.eval_every}, think {low}-{high} ms\n"
    )
    print(
        "| workers | seconds | peak RSS (VmHWM) MiB | sampled max MiB | RSS at start MiB "
        "| updates received | folded | versions | rejected | lost | tasks |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.workers} | {r.seconds:.1f} | {mib(r.peak_kib)} | {mib(r.sampled_max_kib)} "
            f"| {mib(r.start_kib)} | {r.received} | {r.folded} | {r.versions} | {r.rejected} "
            f"| {r.lost} | {r.tasks} |"
        )
    print("\n## ratios\n")
    base, top = rows[0], rows[-1]
    ratio = top.peak_kib / base.peak_kib if base.peak_kib else float("inf")
    sampled = top.sampled_max_kib / base.sampled_max_kib if base.sampled_max_kib else float("inf")
    ok = ratio <= TARGET_RATIO
    print(
        f"peak({top.workers}) / peak({base.workers}) = {ratio:.2f} (target <= {TARGET_RATIO}) "
        f"{'met' if ok else 'MISSED'}; sampled max ratio {sampled:.2f}"
    )
    print(f"growth: {(top.peak_kib - base.peak_kib) / 1024:+.0f} MiB for "
          f"{top.workers - base.workers:+d} workers "
          f"({(top.peak_kib - base.peak_kib) / max(1, top.workers - base.workers) / 1024:.1f} "
          f"MiB per worker)")  # fmt: skip
    return ok


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run each size in turn, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", default="10,100", help="sizes, smallest first")
    p.add_argument("--seconds", type=float, default=45.0, help="load window of each size")
    p.add_argument("--strategy", choices=("fedbuff", "fedasync"), default="fedbuff")
    p.add_argument("--model", choices=sorted(load.MODELS), default="cnn")
    p.add_argument("--think-ms", default="200,1000", help="LOW,HIGH per task")
    p.add_argument("--procs", type=int, default=2, help="worker processes per size")
    p.add_argument("--buffer-size", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--broker", default=load.DEFAULT_BROKER)
    p.add_argument("--out", default="runs/memory")
    p.add_argument("--trace", action="store_true", help="tracemalloc in the aggregator")
    args = p.parse_args(argv)
    sizes = [int(n) for n in args.workers.split(",")]
    rows = []
    for n in sizes:
        print(f"memory: {n} workers, {args.seconds:g} s ...", flush=True)
        rows.append(measure(args, n))
    ok = report(args, rows)
    if any(r.bad for r in rows):
        print("some update was lost or counted twice, or a worker failed: see the run dirs")
        return 1
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
