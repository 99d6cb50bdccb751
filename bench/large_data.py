"""Large local data: a worker trains from files larger than the memory it is allowed, at a stated
throughput, and its memory does not grow with the data set.

    .venv/bin/python bench/large_data.py [--sizes-mb 100,400] [--loader-workers 0,2]
        [--small-mb 50] [--batch-size 64] [--dir DIR]

Issue 9, item 10. Writes synthetic .npz files (np.savez, uncompressed) of 1x64x64 uint8 images
(4 KiB a sample; 16 KiB as float32 tensors) to a temporary directory, then for each file runs a
worker's data path in a subprocess: worker.data.load_local_data with in_memory_max_mb 64 (the
memory the worker is allowed for its data), so the file is read in batches through a DataLoader,
and one epoch over every sample with worker.training.train (the 2NN, batch 64, SGD). Reported:
samples per second of the epoch, and the peak memory of the worker with its loader processes:
the highest sum of PSS (proportional set size: shared pages split between the processes that map
them, so forked loader processes are not counted twice) sampled every 0.1 s from
/proc/PID/smaps_rollup, next to the worker process's own peak RSS (VmHWM). The same is measured
for the in-memory path on a small file (in_memory_max_mb large enough to hold it). "over
baseline" is the peak less the worker's PSS after its imports, before it loads any data (torch
alone is a few hundred MB). Each run first trains 5 batches untimed: the first batches of a
process pay for torch's lazy initialisation.

Figures depend on the machine and on what else runs on it; no test asserts them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIDE = 64
SAMPLE_BYTES = SIDE * SIDE  # uint8, one channel
ALLOWED_MB = 64.0

# Runs in the subprocess: load the data as a worker does, train one epoch, print the figures.
CHILD = r"""
import json, sys, time, torch
from shared.jobs import ModelSpec, TrainingConfig
from shared.models import build_model
from worker.data import LocalData, load_local_data
from worker.settings import WorkerSettings
from worker.training import train

path, in_memory_max_mb, loader_workers, batch_size = sys.argv[1:5]
torch.set_num_threads(1)
baseline_kb = next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup")
                   if line.startswith("Pss:"))
settings = WorkerSettings(worker_id="bench", data=path, in_memory_max_mb=float(in_memory_max_mb),
                          loader_workers=int(loader_workers))
started = time.perf_counter()
data = load_local_data(settings, torch.device("cpu"))
loaded = time.perf_counter() - started
model = build_model(ModelSpec("mlp", (1, 64, 64), 10), seed=0)
config = TrainingConfig(batch_size=int(batch_size), lr=0.01)
# Warm-up: the first batches of a process pay for lazy initialisation (kernels, allocator).
train(model, data, TrainingConfig(batch_size=int(batch_size), max_batches=5), torch.Generator())
generator = torch.Generator().manual_seed(0)
started = time.perf_counter()
seen, metrics = train(model, data, config, generator)
seconds = time.perf_counter() - started
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status")
              if line.startswith("VmHWM:"))
print(json.dumps({"path": "in_memory" if isinstance(data, LocalData) else "data_loader",
                  "samples": seen, "seconds": seconds, "load_seconds": loaded,
                  "worker_hwm_mb": hwm_kb / 1024, "baseline_pss_mb": baseline_kb / 1024}),
      flush=True)
"""


def write_npz(path: Path, megabytes: float) -> int:
    """A file of about `megabytes` MB of uint8 images and int64 labels; return its sample count."""
    count = int(megabytes * 2**20 // SAMPLE_BYTES)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, count)
    # Images that depend on the label a little, so that training has something to learn.
    x = rng.integers(0, 200, (count, SIDE, SIDE), dtype=np.uint8)
    x[np.arange(count), labels, :] = 255
    np.savez(path, x=x, y=labels)
    return count


def pss_kb(pids: list[int]) -> int:
    """The summed proportional set size of these processes, in KiB (0 for those gone)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as fh:
                todo += [int(p) for p in fh.read().split()]
        except OSError:
            pass
    return out


def run(path: Path, in_memory_max_mb: float, loader_workers: int, batch_size: int) -> dict:
    """One worker data path in a subprocess; its figures and peak PSS."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", CHILD, str(path), str(in_memory_max_mb), str(loader_workers)]
    proc = subprocess.Popen(
        [*argv, str(batch_size)], stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, pss_kb(descendants(proc.pid)))
        time.sleep(0.1)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"the worker subprocess failed ({proc.returncode})")
    figures = json.loads(out.strip().splitlines()[-1])
    figures["peak_pss_mb"] = peak / 1024
    return figures


def main() -> None:
    """Write the files, run each configuration, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="100,400", help="file sizes for the loader path")
    parser.add_argument("--loader-workers", default="0,2")
    parser.add_argument("--small-mb", type=float, default=25.0, help="file for the in-memory path")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dir", help="where to write the files (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = []
        small = Path(tmp) / "small.npz"
        n = write_npz(small, args.small_mb)
        in_memory = run(small, 10_000.0, 0, args.batch_size)
        rows.append((small.stat().st_size, n, 0, in_memory))
        for size in (float(s) for s in args.sizes_mb.split(",")):
            path = Path(tmp) / f"data-{size:g}.npz"
            n = write_npz(path, size)
            for workers in (int(w) for w in args.loader_workers.split(",")):
                rows.append((path.stat().st_size, n, workers, run(path, ALLOWED_MB, workers, 64)))
            path.unlink()
    print(f"allowed for data: {ALLOWED_MB:g} MiB (in_memory_max_mb); 1x{SIDE}x{SIDE} uint8 images")
    print(
        f"{'file MB':>8} {'as tensors MB':>13} {'samples':>8} {'path':>12} {'loaders':>7} "
        f"{'samples/s':>9} {'peak PSS MB':>11} {'over baseline':>13} {'worker HWM MB':>13}"
    )
    for file_bytes, count, workers, f in rows:
        tensors_mb = count * SAMPLE_BYTES * 4 / 2**20
        print(
            f"{file_bytes / 2**20:8.0f} {tensors_mb:13.0f} {count:8d} {f['path']:>12} "
            f"{workers:7d} {f['samples'] / f['seconds']:9.0f} {f['peak_pss_mb']:11.0f} "
            f"{f['peak_pss_mb'] - f['baseline_pss_mb']:13.0f} {f['worker_hwm_mb']:13.0f}"
        )


if __name__ == "__main__":
    main()
