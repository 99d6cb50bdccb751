"""Codec throughput: fedq's msgpack codec against pickle and np.save on the same tensors.

    python bench/codec.py                            # both models, median of 5 rounds
    python bench/codec.py --models cnn --repeat 21   # a steadier CNN figure on a busy machine

Prints a table (model, codec, encode GB/s, decode GB/s, wire MB) and ends with the ratios the
project's targets are stated in: decode fedq / np.load >= 1 and encode fedq / pickle >= 0.8.
GB/s is model bytes (the sum of the arrays' nbytes) over seconds; 1 GB = 1e9 bytes. Encoding the
CNN takes about a millisecond and is bound by one copy into a fresh buffer, as pickle's is, so on
a shared machine its encode ratio moves by +-0.2 from run to run; more rounds steady it.
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.jobs import ModelSpec
from shared.messages import Update, decode_message, encode_message
from shared.models import build_model, state_to_numpy

Tensors = dict[str, np.ndarray]

MODELS = {
    "cnn": ModelSpec("cnn", (1, 28, 28), 10),
    "resnet50": ModelSpec("torchvision:resnet50", (3, 224, 224), 1000),
}


def seconds_per_call(fn: Callable[[], Any], number: int) -> float:
    """Return the mean seconds of `number` back-to-back calls of fn, collecting garbage first."""
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def fedq_codec(tensors: Tensors) -> tuple[Callable[[], bytes], Callable[[bytes], Any]]:
    """Encode and decode an Update message carrying the tensors."""
    update = Update(
        job_id="bench",
        update_id="u-1",
        worker_id="w-1",
        task_id="t-1",
        base_version=0,
        round=0,
        kind="weights",
        num_samples=1,
        tensors=tensors,
        metrics={"loss": 0.5},
    )
    return lambda: encode_message(update), decode_message


def pickle_codec(tensors: Tensors) -> tuple[Callable[[], bytes], Callable[[bytes], Any]]:
    """pickle protocol 5 of the dict of arrays (in-band buffers, one bytes object)."""
    return lambda: pickle.dumps(tensors, protocol=5), pickle.loads


def npsave_codec(tensors: Tensors) -> tuple[Callable[[], list[bytes]], Callable[[Any], Any]]:
    """np.save / np.load per tensor, as Flower's ndarray_to_bytes / bytes_to_ndarray do."""

    def encode() -> list[bytes]:
        out = []
        for array in tensors.values():
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            out.append(buffer.getvalue())
        return out

    def decode(blobs: list[bytes]) -> list[np.ndarray]:
        return [np.load(io.BytesIO(blob), allow_pickle=False) for blob in blobs]

    return encode, decode


MIN_SAMPLE_S = 0.05
CODECS = {"fedq": fedq_codec, "pickle": pickle_codec, "np.save": npsave_codec}


def measure(tensors: Tensors, repeat: int) -> dict[str, tuple[float, float, float]]:
    """Return codec -> (encode GB/s, decode GB/s, wire MB) on the tensors.

    The codecs take turns within each of `repeat` rounds, so that a neighbour's load on a shared
    machine falls on all of them alike; each figure is the median over the rounds. A sample
    repeats its call until it lasts MIN_SAMPLE_S (as timeit does), since the CNN takes ~1 ms.
    """
    nbytes = sum(a.nbytes for a in tensors.values())
    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    sizes = {}
    for name, make in CODECS.items():
        encode, decode = make(tensors)
        wire = encode()
        sizes[name] = len(wire) if isinstance(wire, bytes) else sum(len(b) for b in wire)
        calls[name, "encode"] = encode
        calls[name, "decode"] = lambda wire=wire, decode=decode: decode(wire)
    numbers = {
        key: max(1, math.ceil(MIN_SAMPLE_S / seconds_per_call(fn, 1))) for key, fn in calls.items()
    }
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(repeat):
        for key, fn in calls.items():
            samples[key].append(seconds_per_call(fn, numbers[key]))
    gbps = {key: nbytes / statistics.median(times) / 1e9 for key, times in samples.items()}
    return {
        name: (gbps[name, "encode"], gbps[name, "decode"], sizes[name] / 1e6) for name in CODECS
    }


def main() -> None:
    """Measure every codec on every model and print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure (median)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = parser.parse_args()

    table: dict[str, dict[str, tuple[float, float, float]]] = {}
    for model in args.models:
        tensors = state_to_numpy(build_model(MODELS[model], seed=0))
        params = sum(a.size for a in tensors.values())
        print(f"{model}: {len(tensors)} tensors, {params:,} values", file=sys.stderr)
        table[model] = measure(tensors, args.repeat)
        del tensors

    print("| model | codec | encode GB/s | decode GB/s | wire MB |")
    print("|---|---|---:|---:|---:|")
    for model, rows in table.items():
        for codec, (enc, dec, mb) in rows.items():
            print(f"| {model} | {codec} | {enc:.2f} | {dec:.2f} | {mb:.1f} |")
    print("\n## ratios")
    for model, rows in table.items():
        decode_ratio = rows["fedq"][1] / rows["np.save"][1]
        encode_ratio = rows["fedq"][0] / rows["pickle"][0]
        print(f"{model}: decode fedq / np.load = {decode_ratio:.2f} (target >= 1)")
        print(f"{model}: encode fedq / pickle = {encode_ratio:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
