"""Every benchmark of docs/benchmarks.md, one after the other, with one command.

    .venv/bin/pip install -e '.[bench]'          # once: Flower, for the aggregation comparison
    .venv/bin/python bench/all.py [--out runs/bench-all] [--only codec,ingest,...] [--quick]

Runs, in this order, each as its own process on an otherwise idle machine (they measure time, so
nothing else should run beside them): codec, ingest, memory, overhead (fedasync, 1 worker),
overhead-fedbuff (2 workers), time_to_accuracy. Each
one's output goes to <out>/<stamp>/<name>.txt as well as to the terminal; at the end the `## ratios`
sections of all of them are printed together, with the machine they ran on. RabbitMQ must be
reachable at FEDQ_BENCH_BROKER (default amqp://guest:guest@localhost:5672/).

--quick shrinks every benchmark to a smoke run (minutes, not the figures of the docs).
Exits 1 if a benchmark failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# name -> (script, arguments of the full run, arguments of a --quick run)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "codec": ("codec", [], ["--repeat", "2"]),
    "ingest": ("ingest", [], ["--updates", "20", "--repeat", "1"]),
    "memory": ("memory", [], ["--seconds", "15"]),
    "overhead": ("overhead", [], ["--versions", "2"]),
    "overhead-fedbuff": (
        "overhead",
        ["--workers", "2", "--strategy", "fedbuff", "--buffer-size", "2"],
        ["--workers", "2", "--strategy", "fedbuff", "--buffer-size", "2", "--versions", "2"],
    ),
    "time_to_accuracy": (
        "time_to_accuracy",
        [],
        [
            *("--workers", "2", "--strategies", "fedavg,fedbuff", "--slowdowns", "none;1,5"),
            *("--partitions", "iid", "--max-time", "30"),
        ],
    ),
}


def machine() -> str:
    """One line on what the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import torch

    return (
        f"{os.cpu_count()} cores of {cpu}{memory}; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({'CUDA' if torch.cuda.is_available() else 'CPU'})"
    )


def ratios_of(text: str) -> list[str]:
    """The lines of a benchmark's `## ratios` (or `## shares`) sections, tables left out."""
    found: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.startswith("#"):
            inside = line.strip() in ("## ratios", "## shares")
        elif inside and line.strip() and not line.startswith("|"):
            found.append(line if line.startswith("-") else f"- {line}")
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/bench-all")
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated names")
    p.add_argument("--quick", action="store_true", help="smoke runs, not the documented figures")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    print(f"# fedq benchmarks, {time.strftime('%Y-%m-%d %H:%M %Z')}\n{machine()}\n", flush=True)
    summary: list[str] = []
    failed: list[str] = []
    for name in names:
        script, full, quick = BENCHMARKS[name]
        extra = quick if args.quick else full
        if script in ("time_to_accuracy", "memory", "overhead"):
            extra = [*extra, "--out", str(out / name)]
        command = [sys.executable, str(BENCH / f"{script}.py"), *extra]
        print(f"\n# {name}: {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        lines: list[str] = []
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="", flush=True)
                lines.append(line)
        text = "".join(lines)
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        took = time.monotonic() - started
        if proc.returncode != 0:
            failed.append(name)
            summary.append(f"### {name}: FAILED (exit {proc.returncode}) after {took:.0f} s")
        else:
            summary.append(f"### {name} ({took:.0f} s)")
            summary += ratios_of(text)
    print(f"\n# all ratios ({out})\n{machine()}")
    print("\n".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
